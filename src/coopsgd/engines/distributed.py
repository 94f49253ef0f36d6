"""Distributed engine: one process per worker with ``torch.distributed`` ([SPEC] §5, engine 3).

Rank ``r`` runs worker ``r`` (the world size is m); an auxiliary node is held by the ranks whose workers
read it -- every rank for EASGD, FedAvg, LSGD and DOWNPOUR, the ranks of its group for hierarchical
averaging, whose rounds then run in process subgroups (see :mod:`coopsgd.engines.comm` for the placement
and for the collective each kind of mixing matrix uses). Each rank keeps ONE flat state tensor of shape
``(1 + v, b + d [+ d])`` -- its worker's ``[float buffers | parameters | momentum]`` and the auxiliaries'
rows (those of auxiliaries it does not hold are not maintained) -- and its own SGD state. One step ``k`` does exactly what
:class:`coopsgd.engines.simulator.Simulator` does for that worker:

1. ``spec.schedule.active(k)``: an inactive FedAvg client computes nothing;
2. the gradient at the current parameters on this worker's batch (a replica module whose parameters are
   views into the flat row, as the simulator's loop executor);
3. LSGD: at each leader refresh (``k % tau == 0``) one all_gather of the m loss estimates (one float per
   rank); every rank then elects the same leader with the schedule's own rule;
4. ``S_k = spec.schedule.mix(k, ctx)`` -- evaluated identically on every rank (deterministic given the
   step and the gathered losses);
5. torch.optim.SGD's direction D (:mod:`coopsgd.engines.optim`); ``post_mix``: ``x <- x - lr D`` then the
   round; ``pre_mix``: the round then ``x <- x - lr D``; buffers and momentum follow
   :class:`~coopsgd.algorithms.spec.Policies` as in the simulator.

Given the same seeds and data order (:class:`~coopsgd.data.WorkerLoader`, worker r's batches on rank r)
the parameters after K steps equal the simulator's (float64: to 1e-10; tested). Differences from the
simulator: DOWNPOUR either uses the schedule's seeded push order (``downpour_order="schedule"``),
emulated exactly by one all_gather per round and applied in that order on every rank (deterministic,
equal to the simulator), or runs a real asynchronous parameter server (``downpour_order="async"``,
:mod:`coopsgd.engines.parameter_server`: z only on rank 0, pushes applied in arrival order, no barrier
between workers -- the default of ``coopsgd run --engine distributed``, whose ``downpour_order="clock"``
means "the order in which pushes arrive"). Non-blocking EASGD is truly asynchronous (``async_op=True``, waited at the next
round). NaN/Inf in a worker's loss or gradient stops that rank with an error naming it; a NaN that
reaches other workers through mixing is detected by them right after the communication round.

Launching:

* ``torchrun --nproc-per-node N -m coopsgd.engines.distributed --config run.toml`` (one machine; N must
  equal ``workers``). Several machines: ``torchrun --nnodes NODES --nproc-per-node N --rdzv-backend c10d
  --rdzv-endpoint HOST:29400 --rdzv-id JOB -m coopsgd.engines.distributed --config run.toml`` on each.
* :func:`run_distributed` (a RunConfig) or :func:`run_spec` (any spec, model and tensors) start the N
  local processes themselves (:mod:`coopsgd.engines.launch`), bound to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.algorithms.schedules import MixContext, load_schedule_position, schedule_position
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.comm import Mixer, NetEmulation, _schedule_matrices, aux_placement
from coopsgd.engines.executors import FlatLayout, LoopExecutor, build_model, to_batch
from coopsgd.engines.launch import heartbeat as _current_heartbeat
from coopsgd.engines.launch import launch
from coopsgd.engines.optim import SGDOptions, sgd_direction_
from coopsgd.engines.reference import NonFiniteError, consensus_distance
from coopsgd.errors import ConfigError, check_float, check_int

__all__ = [
    "DistributedEngine",
    "DistStepStats",
    "run_distributed",
    "run_spec",
    "SpecJob",
    "communication_table",
    "FAILURE_ENV",
    "DIST_CHECKPOINT_FORMAT",
]

log = logging.getLogger(__name__)

#: Test hook: ``"RANK:STEP:MODE"`` makes rank RANK fail at the start of step STEP; MODE is ``raise``
#: (an exception), ``exit`` (``os._exit(3)``), ``kill`` (SIGKILL itself), ``term`` (SIGTERM itself),
#: ``hang`` (sleep forever) or ``nan`` (that step's loss and gradient become NaN on that rank).
FAILURE_ENV = "COOPSGD_INJECT_FAILURE"
#: With this set to a file path, the injected failure happens once (the file marks it as done).
FAILURE_ONCE_ENV = "COOPSGD_INJECT_FAILURE_ONCE"
_FAILURE_MODES = ("raise", "exit", "kill", "hang", "term", "nan")
_NAN_POLICIES = ("stop", "skip")
_DOWNPOUR_ORDERS = ("schedule", "async")
_LOSS_ESTIMATES = ("batch", "running_mean", "probe")
#: ``format`` tag of the distributed engine's ``checkpoint.pt`` (one file, every rank's state, written by rank 0).
DIST_CHECKPOINT_FORMAT = "coopsgd-distributed-checkpoint-v1"
_RANK_STATE_VERSION = 1

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DistStepStats:
    """What one step did on this rank (``loss`` is this worker's mini-batch loss, NaN when inactive)."""

    step: int
    lr: float
    loss: float
    communicated: bool
    round: int
    pattern: str | None
    info: dict[str, Any] = field(default_factory=dict)


def _parse_failure(value: str | None) -> tuple[int, int, str] | None:
    if not value:
        return None
    try:
        r, k, mode = value.split(":")
        out = (int(r), int(k), mode)
    except ValueError:
        raise ConfigError.invalid(FAILURE_ENV, value, "RANK:STEP:MODE, e.g. 1:3:raise") from None
    if out[2] not in _FAILURE_MODES:
        raise ConfigError.invalid(FAILURE_ENV, value, f"MODE must be one of {', '.join(_FAILURE_MODES)}")
    return out


class DistributedEngine:
    """Runs one worker of an :class:`AlgorithmSpec` in this process; call it on every rank of the group.

    The process group must be initialised (``torch.distributed.init_process_group``) with world size
    ``spec.workers``. Arguments as :class:`coopsgd.engines.simulator.Simulator`; in addition:

    Args:
        net: network emulation (:class:`~coopsgd.engines.comm.NetEmulation`) or ``None``.
        sync_init: broadcast rank 0's initial model to everyone (guards against unseeded inits); not
            done when ``init_params`` gives per-worker starts.
        inject_failure: test hook ``"RANK:STEP:MODE"`` (default: the ``COOPSGD_INJECT_FAILURE`` variable).
        nan_policy: what a NaN/Inf loss, gradient or model does. ``"stop"``: the rank that sees it raises
            :class:`~coopsgd.engines.reference.NonFiniteError` naming the worker and the step at once
            (the others stop when it leaves). ``"skip"``: it stops updating and says so at the next
            communication round, where every rank learns it (one small all_gather of health flags per
            round), restores the state of the last good round (models, auxiliaries, momentum, buffers)
            and goes on with the next data; the data of the dropped steps is not reused. A pending
            non-blocking round is completed before each snapshot (no overlap under ``"skip"``).
        max_skips: with ``"skip"``, the number of consecutive rounds that may be dropped before every
            rank raises :class:`NonFiniteError` naming the workers and steps.
        downpour_order: DOWNPOUR only. ``"schedule"``: the schedule's seeded push order, emulated exactly
            by one all_gather per round (deterministic, equals the simulator). ``"async"``: a real
            asynchronous parameter server (:class:`~coopsgd.engines.parameter_server.AsyncParameterServer`):
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
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
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
        inject_failure: str | None = None,
        nan_policy: str = "stop",
        max_skips: int = 10,
        downpour_order: str = "schedule",
    ) -> None:
        if not isinstance(spec, AlgorithmSpec):
            raise ConfigError.invalid("spec", spec, "must be an AlgorithmSpec (see coopsgd.algorithms.presets)")
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError.invalid("process group", None, "call torch.distributed.init_process_group first")
        self.rank = dist.get_rank()
        world = dist.get_world_size()
        if world != spec.workers:
            raise ConfigError.invalid("workers", spec.workers, f"must equal the world size ({world}): one rank per worker")
        if loss_estimate not in _LOSS_ESTIMATES:
            raise ConfigError.invalid("loss_estimate", loss_estimate, f"choose one of {', '.join(_LOSS_ESTIMATES)}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError.invalid("dtype", dtype, "must be a floating-point torch.dtype")
        if nan_policy not in _NAN_POLICIES:
            raise ConfigError.invalid("nan_policy", nan_policy, f"choose one of {', '.join(_NAN_POLICIES)}")
        self.nan_policy = nan_policy
        self.max_skips = check_int("max_skips", max_skips, minimum=1)
        if downpour_order not in _DOWNPOUR_ORDERS:
            raise ConfigError.invalid("downpour_order", downpour_order, f"choose one of {', '.join(_DOWNPOUR_ORDERS)}")
        self.asynchronous = downpour_order == "async"
        if self.asynchronous and not hasattr(spec.schedule, "round_matrix"):
            raise ConfigError.invalid("downpour_order", downpour_order, f"'async' needs the downpour preset, not {spec.name}")
        if self.asynchronous and torch.device(device).type != "cpu":
            raise ConfigError.invalid("downpour_order", downpour_order, "the asynchronous parameter server runs on "
                                      "CPU tensors with gloo; use downpour_order='schedule' on GPUs")
        if self.asynchronous and nan_policy == "skip":
            raise ConfigError.invalid("nan_policy", nan_policy, "'skip' cannot roll back an asynchronous parameter "
                                                                "server; use 'stop' or downpour_order='schedule'")
        self.spec = spec
        self.m, self.v = spec.workers, spec.auxiliaries
        self.loss_fn = loss_fn
        self.opts = SGDOptions(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = check_int("seed", seed)
        self.loss_estimate = loss_estimate
        self.window = check_int("window", window, minimum=1)
        self.heartbeat = heartbeat or _current_heartbeat()
        self._failure = _parse_failure(inject_failure if inject_failure is not None else os.environ.get(FAILURE_ENV))

        # -- model, layout, flat state ----------------------------------------------------------------
        self.template = self._build_model(model).to(device=self.device, dtype=dtype).train()
        self.layout = FlatLayout.from_module(self.template)
        self.d, self.b = self.layout.d, self.layout.b
        if self.d == 0:
            raise ConfigError.invalid("model", type(self.template).__name__, "has no parameters to train")
        b, d, v = self.b, self.d, self.v
        width = b + d + (d if self.opts.stateful else 0)
        # rows: this worker, then the auxiliaries (none here with an asynchronous server: z lives in it)
        rows = 1 if self.asynchronous else 1 + v
        self._state = torch.zeros((rows, width), dtype=dtype, device=self.device)
        x0 = self.layout.flat_params(self.template).to(self.device, dtype)
        per_worker = False
        if init_params is not None:
            x0 = torch.as_tensor(init_params).to(self.device, dtype)
            if x0.shape[-1] != d or x0.ndim not in (1, 2) or (x0.ndim == 2 and x0.shape[0] != self.m):
                raise ConfigError.invalid("init_params", f"tensor of shape {tuple(x0.shape)}", f"must be ({d},) or ({self.m}, {d})")
            per_worker = x0.ndim == 2
        with torch.no_grad():
            if per_worker:
                self._state[0, b : b + d] = x0[self.rank]
                self._state[1:, b : b + d] = x0.mean(dim=0)
            else:
                self._state[:, b : b + d] = x0
            if b:
                self._state[:, :b] = self.layout.flat_buffers(self.template).to(self.device, dtype)
            if sync_init and not per_worker:
                row = self._state[0, : b + d].clone()
                dist.broadcast(row, src=0)
                self._state[:, : b + d] = row
        if not bool(torch.isfinite(self._state).all()):
            raise ConfigError.invalid("init_params", "non-finite values", "the initial parameters must be finite")
        self.other_buffers: dict[str, Tensor] = {
            name: t.unsqueeze(0).repeat(rows, *([1] * t.dim())).contiguous()
            for name, t in self.layout.other_buffers(self.template).items()
        }
        self._mom_init = torch.zeros(1, dtype=torch.bool, device=self.device)
        lo = 0 if spec.policies.buffers == "mix" else b
        hi = b + d + (d if self.opts.stateful and spec.policies.optimizer_state == "mix" else 0)
        self._mix_cols = (lo, hi)
        self._executor = LoopExecutor(
            self.template, self.layout, self.params_all, self.buffers_all, self.other_buffers, loss_fn, 1
        )
        self._probe: Batch | None = None if probe_batch is None else self._to_batch(probe_batch)
        if spec.leader and loss_estimate == "probe" and self._probe is None:
            raise ConfigError.invalid("probe_batch", None, "loss_estimate='probe' needs probe_batch=(x, y)")
        holders = aux_placement(spec)
        self.mixer = Mixer(
            self.rank, self.m, self.v, net=net, on_finalize=self._zero_aux_momentum, holders=holders,
            matrices=_schedule_matrices(spec.schedule, 4096) if holders is not None else None,
        )
        self.net = self.mixer.net
        self._ps = None
        if self.asynchronous:
            from coopsgd.engines.parameter_server import AsyncParameterServer

            lo, hi = self._mix_cols
            self._aux_fill = self._state[0].clone()  # an auxiliary's columns that are not mixed: initial values
            if self.opts.stateful:
                self._aux_fill[b + d :] = 0.0
            self._ps = AsyncParameterServer(self._state[0, lo:hi].clone(), host=0, net=net, heartbeat=self.heartbeat)

        # -- counters ---------------------------------------------------------------------------------
        self.step_count = 0
        self.rounds = 0
        self.leader: int | None = None
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
        self._nan_next = False  # test hook "nan"
        self.skips_in_a_row = 0
        self.skipped: list[dict[str, Any]] = []  # per dropped round: step, workers, steps dropped
        self._good: dict[str, Any] | None = None
        self._good_step = 0
        if self.nan_policy == "skip":
            self._snapshot(0)

    # ------------------------------------------------------------------------------------------------
    # construction helpers and views
    # ------------------------------------------------------------------------------------------------
    def _build_model(self, model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
        return build_model(model, seed=self.seed, device=self.device)

    def _to_batch(self, batch: Any) -> Batch:
        return to_batch(batch, "batch", device=self.device, dtype=self.dtype)

    @property
    def params_all(self) -> Tensor:
        """(1+v, d) parameters held here: row 0 this worker, rows 1.. the (replicated) auxiliaries."""
        return self._state[:, self.b : self.b + self.d]

    @property
    def buffers_all(self) -> Tensor:
        return self._state[:, : self.b]

    @property
    def params(self) -> Tensor:
        """This worker's flat parameters (a view)."""
        return self._state[0, self.b : self.b + self.d]

    @property
    def momentum(self) -> Tensor | None:
        return self._state[0, self.b + self.d :] if self.opts.stateful else None

    def aux_params(self, j: int = 0) -> Tensor:
        """Auxiliary node ``j``'s parameters on a rank that holds it (completes a pending round first)."""
        j = check_int("j", j, minimum=0, maximum=max(self.v - 1, 0))
        if self.asynchronous:
            raise ConfigError.invalid("j", j, "with an asynchronous server use gather_state() or center_row()")
        if not self.mixer.holds(j):
            raise ConfigError.invalid("j", j, f"auxiliary {j} is held by ranks {list(self.mixer.holders[j])}, "
                                              f"not by rank {self.rank} (gather_state() collects every node)")
        self.mixer.finalize()
        return self._state[1 + j, self.b : self.b + self.d]

    def aux_host(self, j: int) -> int:
        """The designated host rank of auxiliary ``j`` (see :func:`coopsgd.engines.comm.aux_placement`)."""
        if self.asynchronous:  # z on rank 0, worker i's last pull on rank i
            return 0 if j == 0 else j - 1
        return self.mixer.host(j)

    def aux_holders(self, j: int) -> list[int]:
        """The ranks that hold (and update) auxiliary ``j``."""
        h = self.mixer.holders
        return list(range(self.m)) if h is None else list(h[j])

    def _zero_aux_momentum(self) -> None:
        if self.opts.stateful and self.v:
            self._state[1:, self.b + self.d :].zero_()

    # ------------------------------------------------------------------------------------------------
    # stepping
    # ------------------------------------------------------------------------------------------------
    def _inject(self, k: int) -> None:
        f = self._failure
        if f is None or f[0] != self.rank or f[1] != k:
            return
        mode = f[2]
        once = os.environ.get(FAILURE_ONCE_ENV)
        if once:  # fail only the first time (a restarted run then gets past this step)
            marker = Path(once)
            if marker.exists():
                return
            marker.write_text(f"rank {self.rank} step {k} {mode}\n")
        log.warning("rank %d: injected failure %r at step %d", self.rank, mode, k)
        if mode == "nan":
            self._nan_next = True
            return
        if mode == "raise":
            raise RuntimeError(f"injected failure on rank {self.rank} at step {k}")
        if mode == "exit":
            sys.stderr.flush()
            os._exit(3)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the default SIGTERM action ends the process before this returns
        while True:  # hang
            time.sleep(3600)

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
        tau = int(getattr(self.spec.schedule, "tau", self.spec.tau))
        return bool(self.spec.leader) and (k % tau == 0 or getattr(self.spec.schedule, "leaders", 0) is None)

    def _nonfinite(self, what: str, k: int) -> NonFiniteError:
        return NonFiniteError(
            f"non-finite {what} on worker {self.rank} at step {k}: the run diverged "
            f"(try a smaller learning rate, or for EASGD alpha < 2/(m+1))"
        )

    def step(self, batch: Batch | None, lr: float) -> DistStepStats:
        """One step of the algorithm on this rank: this worker's batch (ignored when inactive) and the lr."""
        spec, r = self.spec, self.rank
        lr = check_float("lr", lr, low=0.0)
        k = self.step_count
        now = time.perf_counter()
        if self._t_start is None:
            self._t_start = now - self._resumed_wall
        self.heartbeat(k, "compute")
        self._inject(k)
        t0 = time.perf_counter()
        sched = spec.schedule
        mask = sched.active(k)
        active = mask is None or bool(mask[r])
        res = None
        probe = None
        with torch.no_grad():
            if spec.leader and self.loss_estimate == "probe":
                assert self._probe is not None
                probe = float(self._executor.evaluate(self._probe)[0])
                if not math.isfinite(probe):
                    raise self._nonfinite("probe loss", k)
        loss = math.nan
        if active:
            if batch is None:
                raise ConfigError.invalid("batch", None, f"worker {r} is active at step {k}")
            res = self._executor.compute([self._to_batch(batch)], None)
            with torch.no_grad():
                loss = float(res.losses[0])
                if self._nan_next:
                    self._nan_next = False
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
        if spec.leader:
            est, hist, count = self._estimate(loss, probe)
        self.compute_s += time.perf_counter() - t0

        arrived: float | None = None
        comm0 = self.mixer.stats.comm_s
        losses = None
        if self._needs_losses(k):
            self.heartbeat(k, "comm")
            arrived = time.time()
            losses = self.mixer.gather_floats(est)[:, 0]
        ps_round = self.asynchronous and (k + 1) % int(sched.tau) == 0
        mix = None if self.asynchronous else sched.mix(k, MixContext(step=k, lr=lr, losses=losses))

        with torch.no_grad():
            t1 = time.perf_counter()
            b, d = self.b, self.d
            X = self._state[0:1, b : b + d]
            Mo = self._state[0:1, b + d :] if self.opts.stateful else None
            D = None
            if res is not None:
                D = sgd_direction_(res.grads, X, Mo, self._mom_init if Mo is not None else None, self.opts)
                if res.buffers is not None and b:
                    self._state[0, :b].copy_(res.buffers[0])
            pre = spec.rule == "pre_mix" and mix is not None
            if D is not None and not pre:
                X.sub_(D, alpha=lr)
            self.compute_s += time.perf_counter() - t1
            if ps_round:
                arrived = time.time()
                self._push_pull(k)
            if mix is not None:
                plan = self.mixer.plan(mix.matrix)
                if plan.communicates or self.mixer.pending:
                    if arrived is None:
                        self.heartbeat(k, "comm")
                        arrived = time.time()
                lo, hi = self._mix_cols
                self.mixer.mix(self._state[:, lo:hi], mix.matrix, overlap=spec.overlap)
                t2 = time.perf_counter()
                if D is not None and pre:
                    X.sub_(D, alpha=lr)
                if Mo is not None:
                    if spec.policies.optimizer_state == "reset" and mix.communicates:
                        self._state[:, b + d :].zero_()
                    elif spec.policies.optimizer_state == "mix":
                        self._zero_aux_momentum()
                if mix.communicates and self.nan_policy == "stop" and not bool(torch.isfinite(self._state[0]).all()):
                    raise NonFiniteError(
                        f"non-finite model on worker {r} after the communication round at step {k}: "
                        f"a NaN/Inf reached it from another node (the run diverged)"
                    )
                self.compute_s += time.perf_counter() - t2
            if res is not None:
                for name, val in res.others.items():
                    self.other_buffers[name][0].copy_(val[0])
                if self.opts.stateful:
                    self._mom_init.fill_(True)
        communicated = ps_round or (mix is not None and mix.communicates)
        dropped = False
        if self.nan_policy == "skip" and communicated:
            dropped = self._health_check(k)
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
        if dropped:
            info["dropped"] = self.skipped[-1]
        return DistStepStats(
            step=k, lr=lr, loss=loss, communicated=communicated, round=self.rounds,
            pattern="parameter_server" if ps_round else (None if mix is None else mix.pattern), info=info,
        )

    # ------------------------------------------------------------------------------------------------
    # asynchronous DOWNPOUR
    # ------------------------------------------------------------------------------------------------
    def _push_pull(self, k: int) -> None:
        """Push this worker's accumulated update to the server on rank 0 and pull z (no barrier)."""
        assert self._ps is not None
        ps, ms = self._ps.stats, self.mixer.stats
        sent, waited, emulated = ps.bytes_sent, ps.wait_s, ps.emulated_s
        lo, hi = self._mix_cols
        self._ps.push_pull(self._state[0, lo:hi])
        ms.count("push_pull", ps.bytes_sent - sent, None)
        ms.comm_s += ps.wait_s - waited
        ms.emulated_s += ps.emulated_s - emulated
        b, d = self.b, self.d
        if self.opts.stateful and self.spec.policies.optimizer_state == "reset":
            self._state[0, b + d :].zero_()
        if self.nan_policy == "stop" and not bool(torch.isfinite(self._state[0]).all()):
            raise NonFiniteError(f"non-finite model on worker {self.rank} after its pull at step {k}: "
                                 f"the server model diverged")

    def _async_aux_rows(self, which: list[int]) -> Tensor:
        """Rows of auxiliaries ``which`` (0: z on rank 0; 1+i: worker i's last pull) on every rank (collective)."""
        assert self._ps is not None
        lo, hi = self._mix_cols
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

    def _health_check(self, k: int) -> bool:
        """Every rank's health after the round of step ``k``; drop the round everywhere if one is bad."""
        with torch.no_grad():
            self.mixer.finalize()
            finite = bool(torch.isfinite(self._state[0]).all()) and (
                self.v == 0 or bool(torch.isfinite(self._state[1:]).all()))
        bad_step = -1.0 if self._bad is None else float(self._bad[0])
        flags = self.mixer.gather_floats([bad_step, 0.0 if finite else 1.0])
        self._bad = None
        bad = [(i, int(f[0])) for i, f in enumerate(flags) if f[0] >= 0]
        spread = [i for i, f in enumerate(flags) if f[1] > 0 and f[0] < 0]
        if not bad and not spread:
            self.skips_in_a_row = 0
            self._snapshot(k + 1)
            return False
        what = ", ".join(f"worker {i} at step {s}" for i, s in bad) or \
            f"the models of workers {spread} after the round at step {k}"
        self.skips_in_a_row += 1
        if self.skips_in_a_row > self.max_skips:
            raise NonFiniteError(
                f"non-finite values ({what}): {self.max_skips} rounds in a row dropped already "
                f"(max_skips={self.max_skips}); the run diverged (try a smaller learning rate)"
            )
        rec = {"step": k, "workers": sorted({i for i, _ in bad} | set(spread)),
               "first_steps": {str(i): s for i, s in bad}, "restored_to_step": self._good_step}
        self.skipped.append(rec)
        log.warning("round at step %d dropped (nan_policy=skip): non-finite values (%s); restored the state "
                    "after step %d", k, what, self._good_step)
        self._restore()
        return True

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
        sched = self.spec.schedule
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
            **schedule_position(sched),
            "loss_history": torch.from_numpy(self._hist.astype(np.float64, copy=True)),
            "loss_count": int(self._hist_count),
            "compute_s": float(self.compute_s),
            "comm": {"bytes_sent": float(st.bytes_sent), "bytes_model": float(st.bytes_model),
                     "ops": {str(k): int(n) for k, n in st.ops.items()}, "comm_s": float(st.comm_s),
                     "emulated_s": float(st.emulated_s)},
            "parameter_server": None if self._ps is None else {
                "z": self._ps.server_value() if self.rank == self._ps.host else None,
                "pulled": self._ps.pulled.clone(), "pushes": int(self._ps.stats.pushes)},
            "skips_in_a_row": int(self.skips_in_a_row),
            "skipped": json.dumps(self.skipped),
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
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same rank (same spec, model, dtype and options)."""
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
        self.step_count = int(state["step"])
        self.rounds = int(state["rounds"])
        self.leader = None if state["leader"] is None else int(state["leader"])
        load_schedule_position(self.spec.schedule, state)
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
        self.skips_in_a_row = int(state.get("skips_in_a_row", 0))
        self.skipped = json.loads(state.get("skipped", "[]"))
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
        """Complete any pending non-blocking round (the end of a run waits for the last one).

        With ``nan_policy="skip"`` also a health check (collective): non-finite values since the last
        round drop the steps since then (restoring the last good state); the current state becomes the
        last good one.
        """
        if self.mixer.pending:
            self.mixer.finalize()
            self._t_last = time.perf_counter()
        if self.nan_policy == "skip":
            self._health_check(self.step_count - 1)

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
        if self.spec.center == "auxiliary":
            return self.m
        if self.spec.center == "leader":
            return self.leader if self.leader is not None else 0
        return None

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


# ---------------------------------------------------------------------------------------------------------
# running a spec on tensors (tests, benchmarks, notebooks)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SpecJob:
    """One training run on in-memory tensors, executed by :func:`run_spec` on every rank.

    The data order is :class:`coopsgd.data.WorkerLoader` ``(dataset, parts, batch_size, seed=loader_seed)``:
    rank r takes worker r's batch of each step. ``lr`` is a number or a picklable ``step -> lr`` function.
    """

    spec: AlgorithmSpec
    model: nn.Module | Callable[[], nn.Module]
    dataset: tuple[Tensor, Tensor]
    parts: Sequence[Any]
    batch_size: int
    steps: int
    lr: float | Callable[[int], float] = 0.1
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    dtype: torch.dtype = torch.float64
    seed: int = 0
    loader_seed: int = 0
    loss_estimate: str = "running_mean"
    window: int = 10
    probe_batch: Batch | None = None
    net_latency_ms: float | None = None
    net_bandwidth_mbps: float | None = None
    target_loss: float | None = None
    loss_every: int = 0
    return_state: bool = True
    name: str = ""
    nan_policy: str = "stop"
    max_skips: int = 10
    inject_failure: str | None = None
    downpour_order: str = "schedule"


def _spec_rank_main(rank: int, world: int, jobs: Sequence[SpecJob]) -> list[dict[str, Any]]:
    from coopsgd.data import WorkerLoader

    out = []
    for job in jobs:
        loader = WorkerLoader(job.dataset, job.parts, job.batch_size, seed=job.loader_seed)
        net = NetEmulation(job.net_latency_ms, job.net_bandwidth_mbps)
        eng = DistributedEngine(
            job.spec, job.model, loss_fn=job.loss_fn, momentum=job.momentum, nesterov=job.nesterov,
            weight_decay=job.weight_decay, dtype=job.dtype, seed=job.seed, loss_estimate=job.loss_estimate,
            window=job.window, probe_batch=job.probe_batch, net=net, nan_policy=job.nan_policy,
            max_skips=job.max_skips, inject_failure=job.inject_failure, downpour_order=job.downpour_order,
        )
        dist.barrier()
        losses: list[float] = []
        curve: list[tuple[int, float, float]] = []
        reached: tuple[int, float] | None = None
        spe = loader.steps_per_epoch
        t0 = time.perf_counter()
        for k in range(job.steps):
            epoch, bi = divmod(k, spe)
            batch = loader.batch(epoch, rank, bi)
            lr = job.lr(k) if callable(job.lr) else job.lr
            st = eng.step(batch, lr)
            losses.append(st.loss)
            if job.loss_every and ((k + 1) % job.loss_every == 0 or k + 1 == job.steps):
                # the workers' mean mini-batch loss over the last loss_every steps (one tiny all_reduce)
                recent = [x for x in losses[-job.loss_every:] if math.isfinite(x)]
                t = torch.tensor([sum(recent), float(len(recent))], dtype=torch.float64)
                dist.all_reduce(t)
                mean = float(t[0] / max(t[1], 1.0))
                curve.append((k + 1, time.perf_counter() - t0, mean))
                if job.target_loss is not None and reached is None and mean <= job.target_loss:
                    reached = (k + 1, time.perf_counter() - t0)
        eng.close()
        wall = time.perf_counter() - t0
        timing = eng.timing()
        res: dict[str, Any] = {"name": job.name, "rank": rank, "losses": losses, "wall_s": wall,
                               "rounds": eng.rounds, "timing": timing, "curve": curve, "reached": reached,
                               "leader": eng.leader, "dropped_rounds": list(eng.skipped)}
        if job.return_state:
            state = eng.gather_state()
            res["params"] = state[:, eng.b : eng.b + eng.d].clone()
            res["buffers"] = state[:, : eng.b].clone()
        out.append(res)
        dist.barrier()
    return out


def run_spec(
    jobs: SpecJob | Sequence[SpecJob],
    *,
    timeout_s: float = 60.0,
    backend: str | None = None,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run one or several :class:`SpecJob` s (same number of workers) in one set of local processes.

    Returns rank 0's result per job: ``params`` (m+v, d) and ``buffers`` of every node after the run,
    ``losses`` (rank 0's per-step losses), ``rounds``, ``wall_s``, ``timing`` (per-rank table and
    aggregate), ``curve`` (step, seconds, mean loss) when ``loss_every`` is set and ``reached``
    (step, seconds) for ``target_loss``. Several jobs share one process start-up (faster tests).
    """
    job_list = [jobs] if isinstance(jobs, SpecJob) else list(jobs)
    if not job_list:
        raise ConfigError.invalid("jobs", job_list, "need at least one SpecJob")
    m = job_list[0].spec.workers
    for j in job_list:
        if j.spec.workers != m:
            raise ConfigError.invalid("jobs", j.spec.workers, f"all jobs must have the same number of workers ({m})")
    results = launch(_spec_rank_main, m, (job_list,), timeout_s=timeout_s, backend=backend, env=env)
    return results[0]


# ---------------------------------------------------------------------------------------------------------
# running a RunConfig (CLI, torchrun)
# ---------------------------------------------------------------------------------------------------------


def _checkpoint_path(resume: str | Path) -> Path:
    rp = Path(resume)
    return rp / "checkpoint.pt" if rp.is_dir() else rp


def _load_dist_checkpoint(resume: str | Path, world: int) -> dict[str, Any]:
    """Load and check a distributed checkpoint (format, engine, world size, one state per rank)."""
    from coopsgd.train.rundir import load_checkpoint

    state = load_checkpoint(_checkpoint_path(resume))
    fmt = state.get("format")
    if fmt != DIST_CHECKPOINT_FORMAT:
        hint = " (a simulator checkpoint: resume it with engine 'simulate')" if state.get("engine") == "simulate" else ""
        raise ConfigError.invalid("resume", str(resume),
                                  f"checkpoint format {fmt!r} is not {DIST_CHECKPOINT_FORMAT!r}{hint}")
    if state.get("engine") != "distributed":
        raise ConfigError.invalid("resume", str(resume), f"checkpoint engine {state.get('engine')!r} is not 'distributed'")
    saved = state.get("world_size")
    if saved != world:
        raise ConfigError.invalid("world_size", saved, f"the checkpoint was written by {saved} ranks; this run has "
                                                       f"workers={world} (resume with the same number of workers)")
    ranks = state.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != world:
        raise ConfigError.invalid("resume", str(resume), f"the checkpoint must hold one state per rank ({world})")
    step = state.get("step")
    if not isinstance(step, int) or step < 0:
        raise ConfigError.invalid("resume", str(resume), f"bad checkpoint step {step!r}")
    return state


def _build_problem(config: Any) -> dict[str, Any]:
    """The data, partition, loader, spec and model of a run: exactly the trainer's construction."""
    from coopsgd.train.trainer import build_problem

    return build_problem(config)


def _config_rank_main(rank: int, world: int, config_dict: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    from coopsgd.train.config import RunConfig
    from coopsgd.train.rundir import RunDir
    from coopsgd.train.trainer import evaluate_model, lr_at

    c = RunConfig.from_dict(config_dict)
    if c.workers != world:
        raise ConfigError.invalid("workers", c.workers, f"must equal the number of processes ({world})")
    resume = opts.get("resume")
    ckpt = _load_dist_checkpoint(resume, world) if resume else None
    p = _build_problem(c)
    spec, loader, dtype = p["spec"], p["loader"], p["dtype"]
    start = 0 if ckpt is None else int(ckpt["step"])
    if start > p["total"]:
        raise ConfigError.invalid("max_steps", p["total"], f"the checkpoint is already at step {start}")
    net = NetEmulation(opts.get("net_latency_ms"), opts.get("net_bandwidth_mbps"))
    device = opts.get("device") or "cpu"
    eng = DistributedEngine(
        spec, p["model"], loss_fn=p["loss_fn"], momentum=c.momentum, nesterov=c.nesterov,
        weight_decay=c.weight_decay, dtype=dtype, device=device, seed=c.seed, loss_estimate=c.loss_estimate,
        probe_batch=p["probe"], net=net, nan_policy=c.nan_policy, max_skips=c.max_skips,
        # DOWNPOUR's pushes in the order they arrive: the real arrival order at a server on rank 0
        downpour_order="async" if c.preset == "downpour" and c.downpour_order in ("clock", "async") else "schedule",
    )
    acc, cnt = 0.0, 0
    elapsed0 = 0.0
    if ckpt is not None:
        mine = ckpt["ranks"][rank]
        eng.load_state_dict(mine)
        if eng.step_count != start:
            raise ConfigError.invalid("resume", str(resume), f"rank {rank}'s state is at step {eng.step_count}, "
                                                             f"the checkpoint at step {start}")
        loader.load_state_dict(ckpt["loader"])  # checks seed, batch size and shards
        acc, cnt = float(mine.get("eval_acc", 0.0)), int(mine.get("eval_cnt", 0))
        elapsed0 = float(ckpt.get("train_elapsed_s", 0.0))
    out_dir = opts.get("out")
    logging_on = bool(out_dir)  # every rank must take part in the evaluations' collectives
    rd = RunDir(out_dir) if (out_dir and rank == 0) else None
    if rd is not None:
        extra = {"engine": "distributed", "world_size": world, "steps_per_epoch": loader.steps_per_epoch,
                 "total_steps": p["total"], "spec": spec.describe(), "timeout_s": opts.get("timeout_s"),
                 "net_latency_ms": net.latency_ms, "net_bandwidth_mbps": net.bandwidth_mbps,
                 "aux_hosts": [eng.aux_host(j) for j in range(spec.auxiliaries)], "resumed_from_step": start}
        if p["histograms"] is not None:
            extra["label_histograms"] = p["histograms"].tolist()
        rd.write_config(c.to_dict(), extra)
        if start > 0 and rd.metrics_path.is_file():  # records after the checkpoint's step are replaced
            from coopsgd.train.rundir import atomic_write_bytes, jsonable

            kept = [r for r in RunDir.read_metrics(rd.metrics_path) if r.get("step", 0) <= start]
            atomic_write_bytes(rd.metrics_path, "".join(json.dumps(jsonable(r)) + "\n" for r in kept).encode())
        rd.start_metrics(append=start > 0)
    test_set, train_set, is_lm, loss_fn = p["test_set"], p["train_set"], p["is_lm"], p["loss_fn"]
    spe = loader.steps_per_epoch

    def evaluate(step: int, lr: float, worker_losses: list[float], train_wall: float) -> dict[str, Any]:
        # rank 0 evaluates while the others wait in its next collective (must take < timeout_s)
        eng.heartbeat(step, "compute" if rank == 0 else "comm")
        center = eng.center_row()
        avg = eng.average_row()
        stacked = eng.gather_params()  # collective: every rank takes part
        bytes_t = torch.tensor([eng.mixer.stats.bytes_sent], dtype=torch.float64)
        dist.all_reduce(bytes_t)
        rec: dict[str, Any] = {}
        if rank == 0:
            test = evaluate_model(eng.export(center), test_set.x, test_set.y, loss_fn, is_lm=is_lm, dtype=dtype)
            n = min(c.eval_samples, len(train_set))
            train = evaluate_model(eng.export(avg), train_set.x[:n], train_set.y[:n], loss_fn, is_lm=is_lm, dtype=dtype)
            rec = {"step": step, "epoch": step / spe, "lr": lr, "train_loss": train["loss"],
                   "worker_losses": worker_losses, "test_loss": test["loss"], "rounds": eng.rounds,
                   "bytes_sent": float(bytes_t[0]), "simulated_time_s": train_wall, "wall_time_s": train_wall,
                   "compute_s": eng.compute_s, "communication_s": eng.mixer.stats.comm_s,
                   "consensus_distance": consensus_distance(stacked.detach().to("cpu", torch.float64).numpy(), eng.m)}
            if is_lm:
                rec["test_perplexity"] = test["perplexity"]
            else:
                rec["test_accuracy"] = test["accuracy"]
                rec["train_accuracy"] = train["accuracy"]
            if eng.leader is not None:
                rec["leader"] = eng.leader
            if eng.skipped:
                rec["dropped_rounds"] = list(eng.skipped)
        return rec

    def checkpoint(done: int, elapsed: float) -> None:
        # collective: every rank completes its pending round and sends its state to rank 0, which writes
        eng.finish()
        eng.heartbeat(done, "comm")
        mine = eng.state_dict()
        mine["eval_acc"], mine["eval_cnt"] = float(acc), int(cnt)
        states: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(mine, states, dst=0)
        if rd is not None:
            eng.heartbeat(done, "compute")
            epoch, bi = divmod(done, spe)
            loader.seek(epoch, bi)
            rd.checkpoint({
                "format": DIST_CHECKPOINT_FORMAT, "engine": "distributed", "step": done, "config": c.to_dict(),
                "world_size": world, "loader": loader.state_dict(), "train_elapsed_s": float(elapsed),
                "ranks": states,
            })

    dist.barrier()
    t_start = time.perf_counter() - elapsed0  # a resumed run's clock continues from the checkpoint's
    eval_s = 0.0
    last: dict[str, Any] = {}
    times_agree = bool(c.lr_decay_times_s)
    try:
        if logging_on and start == 0:
            t_e = time.perf_counter()
            last = evaluate(0, lr_at(c, 0, spe, 0.0), [math.nan] * world, 0.0)
            eval_s += time.perf_counter() - t_e
            if rd is not None:
                rd.log(last)
        if start >= p["total"]:  # resumed exactly at the end: the final evaluation only (collective)
            last = evaluate(start, lr_at(c, start, spe, elapsed0), [math.nan] * world, elapsed0)
        for step in range(start, p["total"]):
            elapsed = time.perf_counter() - t_start - eval_s
            if times_agree:  # wall-clock milestones must be the same on every rank: take the slowest clock
                t = torch.tensor([elapsed], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                elapsed = float(t[0])
            lr = lr_at(c, step, spe, elapsed)
            epoch, bi = divmod(step, spe)
            batch = loader.batch(epoch, rank, bi)
            st = eng.step(batch, lr)
            if math.isfinite(st.loss):
                acc += st.loss
                cnt += 1
            done = step + 1
            if done % p["eval_every"] == 0 or done == p["total"]:
                eng.finish()
                t_e = time.perf_counter()
                wl = [0.0] * world
                dist.all_gather_object(wl, acc / cnt if cnt else math.nan)
                acc, cnt = 0.0, 0
                if logging_on or done == p["total"]:
                    last = evaluate(done, lr, wl, t_e - t_start - eval_s) or last
                    if rd is not None:
                        rd.log(last)
                eval_s += time.perf_counter() - t_e
            if logging_on and ((c.checkpoint_every and done % c.checkpoint_every == 0) or done == p["total"]):
                t_e = time.perf_counter()
                checkpoint(done, t_e - t_start - eval_s)
                eval_s += time.perf_counter() - t_e
    finally:
        if rd is not None:
            rd.close()
    eng.close()  # an asynchronous parameter server waits for every worker's last push
    train_wall = time.perf_counter() - t_start - eval_s
    timing = eng.timing()
    summary: dict[str, Any] = {"rank": rank}
    if rank == 0:
        final = {"train_loss": last["train_loss"], "test_loss": last["test_loss"]}
        if is_lm:
            final["test_perplexity"] = last["test_perplexity"]
        else:
            final["test_accuracy"] = last["test_accuracy"]
        summary = {
            "status": "ok",
            "engine": "distributed",
            "preset": spec.name,
            "workers": world,
            "steps": p["total"],
            "resumed_from_step": start,
            "final": final,
            "simulated_time_s": train_wall,
            "simulated_split_s": {k: timing[k] for k in ("compute_s", "communication_s", "idle_s")},
            "wall_time_s": time.perf_counter() - t_start,
            "communication_rounds": eng.rounds,
            "bytes_sent": timing["bytes_sent"],
            "bytes_model": timing["bytes_model"] * 1.0,
            "communication_fraction": timing["communication_fraction"],
            "timing": timing,
            "net": {"latency_ms": net.latency_ms, "bandwidth_mbps": net.bandwidth_mbps},
            "aux_hosts": [eng.aux_host(j) for j in range(spec.auxiliaries)],
        }
        if eng.skipped:
            summary["dropped_rounds"] = list(eng.skipped)
        if rd is not None:
            rd.write_summary(summary)
            summary["out"] = str(rd.path)
    return summary


def run_distributed(
    config: Any,
    *,
    out: str | Path | None = None,
    timeout_s: float = 60.0,
    net_latency_ms: float | None = None,
    net_bandwidth_mbps: float | None = None,
    backend: str | None = None,
    env: dict[str, str] | None = None,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Run a :class:`~coopsgd.train.RunConfig` with ``config.workers`` local processes; return the summary.

    The summary has the shape of :func:`coopsgd.train.trainer.train`'s (``status``, ``preset``,
    ``workers``, ``steps``, ``final``, ``simulated_time_s`` -- here the *measured* training wall-clock,
    evaluation excluded -- ``simulated_split_s``, ``wall_time_s``, ``communication_rounds``,
    ``bytes_sent``) plus ``timing`` (the per-rank compute / communication / idle table and its
    aggregate) and ``communication_fraction``. ``net_latency_ms`` / ``net_bandwidth_mbps`` emulate slow
    links (``None``: the loopback's real speed). A rank that dies, raises, is killed or hangs raises
    :class:`~coopsgd.engines.launch.RankFailure` naming it within ``timeout_s`` + a few seconds.

    With a run directory (``out`` or ``config.out``) rank 0 writes ``checkpoint.pt`` every
    ``config.checkpoint_every`` steps and at the end: format :data:`DIST_CHECKPOINT_FORMAT`, the step,
    the config, the world size and every rank's state (gathered to rank 0; tensors and plain Python, it
    loads with ``torch.load(weights_only=True)``). ``resume`` is such a file or a run directory holding
    one: every rank restores its state (parameters, buffers, momentum, auxiliaries, schedule and leader,
    loss history, RNG, counters) and the run continues from the checkpoint's step; the final
    parameters equal an uninterrupted run's exactly. Metric records after that step are replaced.
    A checkpoint of another format (e.g. the simulator's) or world size is a :class:`ConfigError`.
    """
    from coopsgd.train.config import RunConfig

    if not isinstance(config, RunConfig):
        raise ConfigError.invalid("config", type(config).__name__, "must be a coopsgd.train.RunConfig")
    timeout_s = check_float("timeout_s", timeout_s, low=0.0, low_open=True)
    NetEmulation(net_latency_ms, net_bandwidth_mbps)  # validate here, not in the children
    out_dir = out or config.out
    opts = {"out": str(out_dir) if out_dir else None, "timeout_s": timeout_s, "net_latency_ms": net_latency_ms,
            "net_bandwidth_mbps": net_bandwidth_mbps}
    if resume is not None:  # check here (a clear ConfigError, no process start-up); every rank loads it again
        ck_step = int(_load_dist_checkpoint(resume, config.workers)["step"])
        if config.max_steps is not None and ck_step > config.max_steps:
            raise ConfigError.invalid("max_steps", config.max_steps, f"the checkpoint is already at step {ck_step}")
        opts["resume"] = str(_checkpoint_path(resume).resolve())
    cfg = config.to_dict()
    cfg["engine"] = "distributed"
    results = launch(_config_rank_main, config.workers, (cfg, opts), timeout_s=timeout_s, backend=backend, env=env)
    return results[0]


# ---------------------------------------------------------------------------------------------------------
# torchrun entry point
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m coopsgd.engines.distributed --config run.toml [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m coopsgd.engines.distributed",
                                     description="coopsgd distributed engine (launch with torchrun)")
    parser.add_argument("--config", required=True, help="TOML/YAML/JSON run configuration")
    parser.add_argument("--out", default=None, help="run directory (written by rank 0)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="communication timeout in seconds")
    parser.add_argument("--net-latency-ms", type=float, default=None, help="emulated latency per message")
    parser.add_argument("--net-bandwidth-mbps", type=float, default=None, help="emulated bandwidth")
    parser.add_argument("--backend", default=None, help="gloo (default on CPU) or nccl (GPU)")
    parser.add_argument("--resume", default=None, help="continue from this checkpoint.pt (or run directory)")
    parser.add_argument("--auto-resume", action="store_true",
                        help="resume from the run directory's checkpoint.pt when there is one (for torchrun --max-restarts)")
    ns = parser.parse_args(argv)
    from coopsgd.train.config import RunConfig, load_config

    cfg = RunConfig.from_dict(load_config(ns.config), source=ns.config)
    if ns.auto_resume and ns.resume is None:
        out_dir = ns.out or cfg.out
        if out_dir is None:
            raise ConfigError.invalid("--auto-resume", True, "needs a run directory (--out or `out` in the config)")
        if (Path(out_dir) / "checkpoint.pt").is_file():
            ns.resume = str(Path(out_dir) / "checkpoint.pt")
    if "RANK" not in os.environ:
        summary = run_distributed(cfg, out=ns.out, timeout_s=ns.timeout_s, net_latency_ms=ns.net_latency_ms,
                                  net_bandwidth_mbps=ns.net_bandwidth_mbps, backend=ns.backend, resume=ns.resume)
        print(json.dumps(_one_line(summary)))
        return 0
    use_cuda = ns.backend == "nccl" or (ns.backend is None and torch.cuda.is_available())
    backend = ns.backend or ("nccl" if use_cuda else "gloo")
    device = "cpu"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    from coopsgd.engines.launch import init_torchrun_group  # a key space per torchrun restart attempt

    init_torchrun_group(backend, ns.timeout_s)
    rank = dist.get_rank()
    try:
        opts = {"out": ns.out or cfg.out, "timeout_s": ns.timeout_s, "net_latency_ms": ns.net_latency_ms,
                "net_bandwidth_mbps": ns.net_bandwidth_mbps, "device": device, "resume": ns.resume}
        summary = _config_rank_main(rank, dist.get_world_size(), cfg.to_dict(), opts)
    except BaseException as exc:
        print(f"[coopsgd rank {rank}] {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(_one_line(summary)))
    return 0


def _one_line(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("status", "preset", "workers", "steps", "final", "simulated_time_s", "communication_rounds",
            "communication_fraction", "out")
    return {k: summary[k] for k in keys if k in summary}


if __name__ == "__main__":
    # run inside the importable module (not __main__) so that the rank functions pickle by their real name
    from coopsgd.engines.distributed import main as _main

    sys.exit(_main())
