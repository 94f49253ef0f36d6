"""Runs on the distributed engine: every rank runs the one training loop (:func:`coopsgd.train.loop.run_loop`).

* :func:`run_distributed` -- a :class:`~coopsgd.train.RunConfig` with ``workers`` local processes (bound to
  127.0.0.1; :mod:`coopsgd.engines.distributed.launch`); :func:`rank_main` is what each rank runs, also under
  ``torchrun`` (:mod:`coopsgd.torchrun`).
* :func:`run_spec` -- any :class:`~coopsgd.algorithms.AlgorithmSpec`, model and in-memory tensors
  (:class:`SpecJob`; tests, benchmarks, notebooks).

Both set up their runs through :mod:`coopsgd.train.setup` (the engine from a small factory,
:func:`make_rank_engine` / :func:`make_job_engine`; the loop plan from :func:`~coopsgd.train.setup.prepare_run`).
Rank 0 writes the run directory. A checkpoint is the one run checkpoint layout
(:func:`coopsgd.train.checkpoint.checkpoint_record`) with one engine state envelope per rank (``ranks``),
gathered to rank 0, and reads through :func:`coopsgd.train.checkpoint.load_run_checkpoint`.

Test hook: the environment variable ``COOPSGD_INJECT_FAILURE="RANK:STEP:MODE"`` (read here, by the runner,
and passed to the engine as a :data:`~coopsgd.engines.distributed.FaultHook`) makes rank RANK fail at step
STEP (:data:`~coopsgd.engines.distributed.FAILURE_MODES`); with ``COOPSGD_INJECT_FAILURE_ONCE=FILE`` only
the first time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.data import WorkerLoader
from coopsgd.engines.base import Engine, StepStats
from coopsgd.engines.distributed import FAILURE_MODES, DistributedEngine, FaultHook, fault_hook
from coopsgd.engines.distributed.communicator import NetEmulation
from coopsgd.engines.distributed.launch import RankFailure, launch, listening_addresses
from coopsgd.errors import ConfigError, CoopSGDError, Interrupted, check_float, describe_os_error
from coopsgd.fileio import discard_unused, first_missing
from coopsgd.train.checkpoint import checkpoint_path, checkpoint_record, load_run_checkpoint
from coopsgd.train.config import MAX_TIMEOUT_S, RunConfig
from coopsgd.train.loop import LoopState
from coopsgd.train.problem import Problem, build_problem, feed_from
from coopsgd.train.records import summarize
from coopsgd.train.rundir import (
    RunDir,
    atomic_write_json,
    check_run_dir,
    config_difference,
    jsonable,
    lock_directory,
    tensorboard_enabled,
)
from coopsgd.train.setup import (
    Workload,
    check_state_fits,
    finished_summary,
    open_run_dir,
    prepare_config_run,
    prepare_run,
    problem_record,
    restore_data,
)

__all__ = ["run_distributed", "run_spec", "SpecJob", "rank_main", "make_rank_engine", "make_job_engine",
           "FAILURE_ENV", "FAILURE_ONCE_ENV", "fault_from_env", "one_line", "RankCheckError", "agree_on_checks",
           "check_outcome", "rank_placement", "config_digest", "agree_on_config"]

#: ``"RANK:STEP:MODE"``: make rank RANK fail at the start of step STEP (tests).
FAILURE_ENV = "COOPSGD_INJECT_FAILURE"
#: With this set to a file path, the injected failure happens once (the file marks it as done).
FAILURE_ONCE_ENV = "COOPSGD_INJECT_FAILURE_ONCE"

Batch = tuple[Tensor, Tensor]


def parse_fault(value: str | None, *, once_file: str | None = None) -> FaultHook | None:
    """A fault hook from ``"RANK:STEP:MODE"`` (``None`` or ``""``: none)."""
    if not value:
        return None
    try:
        r, k, mode = value.split(":")
        rank, step = int(r), int(k)
    except ValueError:
        raise ConfigError.invalid(FAILURE_ENV, value, "RANK:STEP:MODE, e.g. 1:3:raise") from None
    if mode not in FAILURE_MODES:
        raise ConfigError.invalid(FAILURE_ENV, value, f"MODE must be one of {', '.join(FAILURE_MODES)}")
    return fault_hook(rank, step, mode, once_file=once_file)


def fault_from_env() -> FaultHook | None:
    """The fault hook the test environment asks for (:data:`FAILURE_ENV`, :data:`FAILURE_ONCE_ENV`)."""
    return parse_fault(os.environ.get(FAILURE_ENV), once_file=os.environ.get(FAILURE_ONCE_ENV) or None)


# ---------------------------------------------------------------------------------------------------------
# running a spec on tensors (tests, benchmarks, notebooks)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SpecJob:
    """One training run on in-memory tensors, executed by :func:`run_spec` on every rank.

    The data order is :class:`coopsgd.data.WorkerLoader` ``(dataset, parts, batch_size, seed=loader_seed)``:
    rank r takes worker r's batch of each step. ``lr`` is a number or a picklable ``step -> lr`` function.
    ``optimizer``: the workers' inner optimizer, one value (:class:`~coopsgd.algorithms.inner.OptimizerSettings`,
    a name, a ``torch.optim`` class, or ``None``: the spec's own, else SGD; see
    :func:`coopsgd.engines.optim.optimizer_settings`). ``inject_failure`` is a test hook ``"RANK:STEP:MODE"``.
    """

    spec: AlgorithmSpec
    model: nn.Module | Callable[[], nn.Module]
    dataset: tuple[Tensor, Tensor]
    parts: Sequence[Any]
    batch_size: int
    steps: int
    lr: float | Callable[[int], float] = 0.1
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    optimizer: OptimizerSettings | str | type | None = None
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


def make_job_engine(job: SpecJob, *, heartbeat: Callable[[int, str], None] | None = None) -> DistributedEngine:
    """The distributed engine's factory for a :class:`SpecJob` (this process's rank)."""
    net = NetEmulation(job.net_latency_ms, job.net_bandwidth_mbps)
    return DistributedEngine(
        job.spec, job.model, loss_fn=job.loss_fn, optimizer=job.optimizer, dtype=job.dtype, seed=job.seed,
        loss_estimate=job.loss_estimate, window=job.window, probe_batch=job.probe_batch, net=net,
        nan_policy=job.nan_policy, fault=parse_fault(job.inject_failure), downpour_order=job.downpour_order,
        heartbeat=heartbeat,
    )


class _JobTrace:
    """What a tensor job records: rank 0's per-step losses, the mean-loss curve every ``loss_every`` steps
    (step, seconds, mean loss) and when ``target_loss`` was first reached."""

    def __init__(self, job: SpecJob, rank: int) -> None:
        self.job, self.rank = job, rank
        self.losses: list[float] = []
        self.curve: list[tuple[int, float, float]] = []
        self.reached: list[tuple[int, float]] = []
        self.t0 = time.perf_counter()

    def on_step(self, stats: StepStats) -> None:
        self.losses.append(float(stats.losses[self.rank]))

    def evaluate(self, engine: Engine, step: int, lr: float, worker_losses: np.ndarray, st: LoopState) -> dict[str, Any]:
        # the workers' mean mini-batch loss over the last loss_every steps (reduced by the loop)
        if step == 0 or not self.job.loss_every:
            return {}
        vals = worker_losses[np.isfinite(worker_losses)]
        mean = float(vals.mean()) if vals.size else math.nan
        elapsed = time.perf_counter() - self.t0
        self.curve.append((step, elapsed, mean))
        if self.job.target_loss is not None and not self.reached and mean <= self.job.target_loss:
            self.reached.append((step, elapsed))
        return {}


def _job_lr(lr: float | Callable[[int], float]) -> Callable[[int, float], float]:
    return lambda k, _t: float(lr(k) if callable(lr) else lr)


def _run_job(rank: int, job: SpecJob, heartbeat: Callable[[int, str], None] | None) -> dict[str, Any]:
    """One :class:`SpecJob` on this rank: its engine, the one loop set-up, its results."""
    loader = WorkerLoader(job.dataset, job.parts, job.batch_size, seed=job.loader_seed)
    eng = make_job_engine(job, heartbeat=heartbeat)
    dist.barrier()
    trace = _JobTrace(job, rank)
    work = Workload(total_steps=job.steps, eval_every=job.loss_every or max(job.steps, 1), lr=_job_lr(job.lr),
                    feed=feed_from(loader), evaluate=trace.evaluate)
    setup = prepare_run(eng, work, nan_policy=job.nan_policy, max_skips=job.max_skips, on_step=trace.on_step)
    _, state = setup.run(None)
    eng.close()
    wall = time.perf_counter() - trace.t0
    res: dict[str, Any] = {"name": job.name, "rank": rank, "losses": trace.losses, "wall_s": wall,
                           "rounds": eng.rounds, "timing": eng.timing(), "curve": trace.curve,
                           "reached": trace.reached[0] if trace.reached else None, "leader": eng.leader,
                           "dropped_rounds": list(state.dropped)}
    if job.return_state:
        full = eng.gather_state()
        res["params"] = full[:, eng.b : eng.b + eng.d].clone()
        res["buffers"] = full[:, : eng.b].clone()
    return res


def _spec_rank_main(rank: int, world: int, jobs: Sequence[SpecJob], *,
                    heartbeat: Callable[[int, str], None] | None = None) -> list[dict[str, Any]]:
    out = []
    for job in jobs:
        out.append(_run_job(rank, job, heartbeat))
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
    aggregate), ``curve`` (step, seconds, mean loss) when ``loss_every`` is set, ``reached``
    (step, seconds) for ``target_loss`` and ``dropped_rounds`` (``nan_policy="skip"``). Several jobs share
    one process start-up (faster tests).
    """
    job_list = [jobs] if isinstance(jobs, SpecJob) else list(jobs)
    if not job_list:
        raise ConfigError.invalid("jobs", job_list, "need at least one SpecJob")
    m = job_list[0].spec.workers
    for j in job_list:
        if j.spec.workers != m:
            raise ConfigError.invalid("jobs", j.spec.workers, f"all jobs must have the same number of workers ({m})")
        parse_fault(j.inject_failure)  # a bad hook is an error here, not in every rank
    results = launch(_spec_rank_main, m, (job_list,), timeout_s=timeout_s, backend=backend, env=env)
    return results[0]


# ---------------------------------------------------------------------------------------------------------
# running a RunConfig (CLI, torchrun)
# ---------------------------------------------------------------------------------------------------------


def rank_device(device: str, rank: int) -> str:
    """The device of this rank for a run on ``device`` (``RunConfig.execution.device``): ``cpu``, or for ``cuda`` the
    GPU of the rank's local rank (``cuda:LOCAL_RANK``; made the current CUDA device, as NCCL needs)."""
    if not device.startswith("cuda"):
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    count = torch.cuda.device_count()
    if local >= count:
        raise ConfigError.invalid("device", device, f"local rank {local} needs its own GPU (cuda:{local}) but this "
                                                    f"machine has {count} visible CUDA device(s): start at most "
                                                    f"{count} processes per machine")
    torch.cuda.set_device(local)
    return f"cuda:{local}"


class RankCheckError(ConfigError):
    """A rank's checks before training failed (:func:`agree_on_checks`): every rank raises it, ``rank`` names
    the rank that found the problem (the lowest one, when several did)."""

    def __init__(self, message: str, *, rank: int, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.rank = rank


def check_outcome(error: BaseException | None) -> dict[str, Any] | None:
    """What a rank tells the others about its checks (:func:`agree_on_checks`): ``None`` when they passed."""
    if error is None:
        return None
    return {"type": type(error).__name__, "message": " ".join(str(error).split()),
            "expected": isinstance(error, CoopSGDError), "field": getattr(error, "field", None)}


def config_digest(config: dict[str, Any]) -> str:
    """A hash of a rank's whole resolved configuration (a :meth:`RunConfig.to_dict`; ``out``, which only rank 0
    uses, left out): ranks that hold the same digest run the same configuration."""
    text = json.dumps(jsonable({k: v for k, v in config.items() if k != "out"}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def agree_on_config(world: int, config: dict[str, Any]) -> None:
    """Every rank tells the others the hash of its whole resolved configuration (:func:`config_digest`; one
    small ``all_gather_object``) before the first step: under torchrun each rank reads its own config file,
    and ranks that would train different configurations (another lr: silently; another tau: a hang) stop at
    once. A mismatch raises :class:`RankCheckError` on every rank, naming the first rank whose configuration
    differs from rank 0's and the first differing field (a second gather, of the configurations, only then)."""
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, config_digest(config))
    if len(set(digests)) <= 1:
        return
    configs: list[Any] = [None] * world
    dist.all_gather_object(configs, {k: v for k, v in config.items() if k != "out"})
    for r in range(1, world):
        diff = config_difference(configs[0], configs[r], ignore=())
        if diff is not None:
            key, a, b = diff
            raise RankCheckError(f"the ranks run different configurations: {key} is {a!r} on rank 0 and {b!r} on "
                                 f"rank {r}; every rank must read the same config", rank=r, field=key)
    raise RankCheckError("the ranks run different configurations (their hashes differ); every rank must read "
                         "the same config", rank=int(np.argmax([d != digests[0] for d in digests])))


def agree_on_checks(rank: int, world: int, error: BaseException | None) -> None:
    """Every rank tells the others whether its checks before training failed (one ``all_gather_object``).

    Needed where no parent checked the run first (``torchrun``): a check may fail on some ranks only (rank 0
    checks the run directory; a rank's local GPU may be missing), and a rank that went on would wait in its
    next collective until the timeout. If any rank failed, every rank raises :class:`RankCheckError` with the
    lowest failing rank's message (one line, prefixed ``rank R:`` unless R is 0), so that rank 0 can report
    it once; a failing rank whose error is not a :class:`~coopsgd.errors.CoopSGDError` (a bug) re-raises its
    own exception, traceback included.
    """
    found: list[Any] = [None] * world
    dist.all_gather_object(found, check_outcome(error))
    bad = [(r, e) for r, e in enumerate(found) if e is not None]
    if not bad:
        return
    if error is not None and not isinstance(error, CoopSGDError):
        raise error
    r, e = bad[0]
    text = e["message"] if e["expected"] else f"{e['type']}: {e['message']}"
    if r != 0 or not e["expected"]:
        text = f"rank {r}: {text}"
    raise RankCheckError(text, rank=r, field=e["field"] if e["expected"] else None)


def rank_placement(rank: int, device: str) -> dict[str, Any]:
    """Where this rank runs: global ``rank``, ``local_rank`` and ``node`` (torchrun's ``LOCAL_RANK`` and
    ``GROUP_RANK``; 0 and the rank for a local launch), ``host``, ``device`` and the TCP addresses it listens
    on (``listening``, from ``/proc``; empty elsewhere). Rank 0 records every rank's in ``environment.json``
    (``ranks``)."""
    return {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", rank)),
            "node": int(os.environ.get("GROUP_RANK", 0)), "host": socket.gethostname(), "device": device,
            "listening": listening_addresses()}


@dataclass(frozen=True)
class _RankInputs:
    """What one rank checked and built before its first collective (:func:`_rank_inputs`)."""

    config: RunConfig
    problem: Problem
    device: str
    net: NetEmulation
    fault: FaultHook | None
    tensorboard: bool
    checkpoint: dict[str, Any] | None
    start: int
    owns_dir: bool = False  # rank 0 under torchrun: no parent checked or locked the run directory


def _rank_inputs(rank: int, world: int, config_dict: dict[str, Any], opts: dict[str, Any]) -> _RankInputs:
    """The checks and set-up of a rank that need no collective: the config, the device, the run directory
    (rank 0, where no parent checked it), the checkpoint, the problem and its data position."""
    c = RunConfig.from_dict(config_dict)
    if c.algorithm.workers != world:
        raise ConfigError.invalid("workers", c.algorithm.workers, f"must equal the number of processes ({world})")
    device = opts.get("device") or rank_device(c.execution.device, rank)
    resume = opts.get("resume")
    out_dir: str | None = opts.get("out")
    under_torchrun = bool(out_dir) and rank == 0 and not opts.get("checked")  # no parent checked or locked it
    if under_torchrun and out_dir:
        check_run_dir(out_dir, c.to_dict(), overwrite=bool(opts.get("overwrite")), resume=bool(resume))
    tensorboard = tensorboard_enabled(c.output.tensorboard, has_dir=bool(out_dir))
    # a checkpoint from another directory (torchrun --resume) must be of this configuration too
    ckpt = load_run_checkpoint(resume, "distributed", world=world, config=c.to_dict()) if resume else None
    problem = build_problem(c)
    start = 0 if ckpt is None else restore_data(ckpt, problem)  # the loader checks seed, batch size and shards
    net = NetEmulation(opts.get("net_latency_ms"), opts.get("net_bandwidth_mbps"))
    return _RankInputs(c, problem, device, net, fault_from_env(), tensorboard, ckpt, start, under_torchrun)


def _agree_to_start(rank: int, world: int, inp: _RankInputs, opts: dict[str, Any]) -> tuple[dict[str, Any] | None, Any]:
    """Under torchrun, after the ranks agreed on their checks and their configuration: ``(None, lock)`` when
    the run goes on, global rank 0 holding its run directory's lock (a :class:`coopsgd.fileio.DirLock`, kept
    until the run ends) from here: it is taken only now, so ranks that disagree leave no directory, lock file
    or record behind; ``(summary, None)`` for a finished run that was resumed (every rank learns it from rank
    0: nothing is evaluated, appended or rewritten). Taking the lock is a check like the others: another
    holder stops every rank (:func:`agree_on_checks`, exit 2)."""
    out_dir = opts.get("out")
    done: list[Any] = [None]
    if rank == 0 and inp.checkpoint is not None:
        done[0] = finished_summary(out_dir, int(inp.checkpoint["step"]), inp.problem.total_steps)
    dist.broadcast_object_list(done, src=0)
    if done[0] is not None:
        return (done[0] if rank == 0 else {"rank": rank}), None
    error: BaseException | None = None
    lock = None
    if inp.owns_dir and out_dir:
        try:
            lock = lock_directory(out_dir, "run directory")
        except (CoopSGDError, OSError) as exc:
            error = exc if isinstance(exc, CoopSGDError) else ConfigError(describe_os_error(exc), field="out")
    agree_on_checks(rank, world, error)
    return None, lock


def make_rank_engine(config: RunConfig, problem: Problem, *, device: str, net: NetEmulation,
                     fault: FaultHook | None = None,
                     heartbeat: Callable[[int, str], None] | None = None) -> DistributedEngine:
    """The distributed engine's factory for one rank of a :class:`RunConfig` run (collective: every rank
    starts from rank 0's model). ``heartbeat``: the launcher's, injected (none under torchrun)."""
    c, p = config, problem
    return DistributedEngine(
        p.spec, p.model, loss_fn=p.loss_fn, optimizer=c.optimizer, dtype=p.dtype, device=device,
        seed=c.execution.seed, loss_estimate=c.algorithm.loss_estimate, probe_batch=p.probe, net=net,
        nan_policy=c.execution.nan_policy, fault=fault, heartbeat=heartbeat,
        # pushes of a sequential schedule (DOWNPOUR) in the order they arrive: a real server on rank 0
        downpour_order="async" if p.spec.schedule.sequential and c.algorithm.downpour_order in ("clock", "async")
        else "schedule",
    )


def rank_main(rank: int, world: int, config_dict: dict[str, Any], opts: dict[str, Any], *,
              heartbeat: Callable[[int, str], None] | None = None) -> dict[str, Any]:
    """One rank of a :class:`RunConfig` run: build the problem, the engine, run the loop; rank 0 writes.

    ``opts``: ``out``, ``resume``, ``timeout_s``, ``net_latency_ms``, ``net_bandwidth_mbps``, ``device``
    (default: :func:`rank_device` of the config's ``device``); ``agree_errors`` (torchrun): the ranks agree
    on the outcome of their checks before the first collective (:func:`agree_on_checks`).
    """
    agree = bool(opts.get("agree_errors"))
    try:  # checks and set-up without any collective
        inp = _rank_inputs(rank, world, config_dict, opts)
    except Exception as exc:
        if agree:
            agree_on_checks(rank, world, exc)
        raise
    if agree:  # and on the configuration: every rank must train the same one
        agree_on_checks(rank, world, None)
        agree_on_config(world, inp.config.to_dict())
        finished, held = _agree_to_start(rank, world, inp, opts)  # held: rank 0's lock, until the run returns
        if finished is not None:
            return finished
    c, p, out_dir, ckpt = inp.config, inp.problem, opts.get("out"), inp.checkpoint
    placement: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(rank_placement(rank, inp.device), placement, dst=0)
    eng = make_rank_engine(c, p, device=inp.device, net=inp.net, fault=inp.fault, heartbeat=heartbeat)
    rd: RunDir | None = None

    def checkpoint(done: int, st: LoopState) -> None:
        # collective: every rank sends its state to rank 0, which writes one file
        eng.heartbeat(done, "comm")
        states: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(eng.state_dict(), states, dst=0)
        if rd is not None:
            assert states is not None
            eng.heartbeat(done, "compute")
            rd.checkpoint(checkpoint_record(c, "distributed", done, p.loader, st, ranks=states))

    def lr_agree(elapsed: float) -> float:
        # wall-clock milestones must be the same on every rank: take the slowest clock
        t = torch.tensor([elapsed], dtype=torch.float64, device=eng.device)  # NCCL: on the rank's GPU
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    wall0 = 0.0 if ckpt is None else float(ckpt.get("wall_time_s", LoopState.from_dict(ckpt.get("loop")).train_s))
    setup = prepare_config_run(
        c, p, eng, resume=None if ckpt is None else (ckpt, ckpt["ranks"][rank]), start=inp.start,
        resume_path=str(opts.get("resume")), who=f"rank {rank}", checkpoint=checkpoint if out_dir else None,
        checkpoint_at_end=bool(out_dir), lr_agree=lr_agree, wall_offset=wall0,
        progress=f"{p.spec.name} x{world} (distributed)" if opts.get("progress") and rank == 0 else None)
    evaluate = setup.plan.evaluate

    def evaluate_alive(engine: Engine, step: int, *args: Any) -> dict[str, Any]:
        # rank 0 evaluates while the others wait in its next collective (must take < timeout_s)
        eng.heartbeat(step, "compute" if rank == 0 else "comm")
        return evaluate(engine, step, *args)

    setup.plan.evaluate = evaluate_alive
    if out_dir and rank == 0:  # refuses another configuration's run; removes the old run's files unless resuming
        extra = {"engine": "distributed", "world_size": world, "timeout_s": opts.get("timeout_s"),
                 "net_latency_ms": inp.net.latency_ms, "net_bandwidth_mbps": inp.net.bandwidth_mbps,
                 "aux_hosts": [eng.aux_host(j) for j in range(p.spec.auxiliaries)], "ranks": placement,
                 **problem_record(p, setup.start, p.histograms)}
        rd = open_run_dir(out_dir, c, extra, overwrite=bool(opts.get("overwrite")), resume=bool(opts.get("resume")),
                          start=setup.start, tensorboard=inp.tensorboard, eval_every=setup.plan.eval_every,
                          total_steps=p.total_steps, lock=not opts.get("locked"))  # a local launch: the launcher holds the lock
    try:
        dist.barrier()
        t0 = time.perf_counter()
        last, _ = setup.run(rd)
        eng.close()  # an asynchronous parameter server waits for every worker's last push
        timing = eng.timing()  # collective
        if rank != 0:
            return {"rank": rank}
        return _rank0_summary(c, p, eng, timing, inp.net, last, rd, start=setup.start,
                              wall=wall0 + time.perf_counter() - t0)
    finally:
        if rd is not None:
            rd.release()


def _rank0_summary(c: RunConfig, p: Problem, eng: DistributedEngine, timing: dict[str, Any], net: NetEmulation,
                   last: dict[str, Any], rd: RunDir | None, *, start: int, wall: float) -> dict[str, Any]:
    """Rank 0's summary of a distributed run (written to the run directory, if any)."""
    summary = summarize(p.spec, c, last, total_steps=p.total_steps, wall=wall, engine="distributed", is_lm=p.is_lm,
                        extra={
                            "resumed_from_step": start,
                            "measured_split_s": {k: timing[k] for k in ("compute_s", "communication_s", "idle_s")},
                            "bytes_model": timing["bytes_model"] * 1.0,
                            "communication_fraction": timing["communication_fraction"],
                            "timing": timing,
                            "net": {"latency_ms": net.latency_ms, "bandwidth_mbps": net.bandwidth_mbps},
                            "aux_hosts": [eng.aux_host(j) for j in range(p.spec.auxiliaries)]})
    summary["bytes_sent"] = timing["bytes_sent"]
    if rd is not None:
        rd.write_summary(summary)
        summary["out"] = str(rd.path)
    return summary


def run_distributed(
    config: RunConfig,
    *,
    out: str | Path | None = None,
    timeout_s: float = 60.0,
    net_latency_ms: float | None = None,
    net_bandwidth_mbps: float | None = None,
    backend: str | None = None,
    env: dict[str, str] | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run a :class:`~coopsgd.train.RunConfig` with ``config.algorithm.workers`` local processes; return the summary.

    The summary has the keys of :func:`coopsgd.train.trainer.train`'s. Time here is measured, not
    simulated: ``time_s`` / ``measured_train_s`` (training wall-clock, evaluation excluded; ``time_source``
    is ``"measured"``), ``simulated_time_s`` is ``None``; plus ``measured_split_s`` and ``timing`` (the
    per-rank compute / communication / idle table and its aggregate) and ``communication_fraction``.
    ``net_latency_ms`` / ``net_bandwidth_mbps`` emulate slow links (``None``: the loopback's real speed).
    A rank that dies, raises, is killed or hangs raises :class:`~coopsgd.engines.distributed.launch.RankFailure`
    naming it within ``timeout_s`` + a few seconds. ``config.execution.device`` ``"cuda"`` puts rank r on its own GPU
    (``cuda:r``) with NCCL between the ranks (``backend`` default: ``"nccl"`` there, ``"gloo"`` on the CPU).

    With a run directory (``out`` or ``config.output.out``) rank 0 writes ``checkpoint.pt`` every
    ``config.output.checkpoint_every`` steps and at the end (:data:`~coopsgd.train.checkpoint.CHECKPOINT_FORMAT`,
    engine ``"distributed"``, one engine state per rank under ``ranks``; it loads with
    ``torch.load(weights_only=True)``). ``resume`` is such a file or a run directory holding one: every
    rank restores its state and the run continues from the checkpoint's step; the final parameters
    equal an uninterrupted run's exactly. Metric records after that step are replaced.

    The run directory must not hold another configuration's run unless ``overwrite``
    (:func:`coopsgd.train.rundir.check_run_dir`): checked here, before any process starts. ``progress``:
    rank 0 shows its progress on stderr (:class:`coopsgd.train.progress.Progress`).
    """
    if not isinstance(config, RunConfig):
        raise ConfigError.invalid("config", type(config).__name__, "must be a coopsgd.train.RunConfig")
    timeout_s = check_float("timeout_s", timeout_s, low=0.0, low_open=True, high=MAX_TIMEOUT_S)
    # build and check the whole problem here (data against the model, shard sizes, the spec), so that a
    # bad input is one line and exit status 2 before any process starts
    problem = build_problem(config)
    if not config.execution.device.startswith("cuda"):  # every rank's rows on this machine's memory
        check_state_fits(config.algorithm.workers + problem.spec.auxiliaries, problem.model, problem.dtype,
                         config.optimizer, "cpu")
    NetEmulation(net_latency_ms, net_bandwidth_mbps)  # validate here, not in the children
    if config.execution.device.startswith("cuda"):  # one GPU per rank, NCCL between them
        if torch.cuda.device_count() < config.algorithm.workers:
            raise ConfigError.invalid("device", config.execution.device, f"a local run puts each of the {config.algorithm.workers} "
                                      f"workers on its own GPU; this machine has {torch.cuda.device_count()}")
        backend = backend or "nccl"
    out_dir = out or config.output.out
    opts: dict[str, Any] = {"out": str(out_dir) if out_dir else None, "timeout_s": timeout_s,
                            "net_latency_ms": net_latency_ms, "net_bandwidth_mbps": net_bandwidth_mbps}
    cfg = config.to_dict()
    cfg["engine"] = "distributed"
    if resume is not None:  # check here (a clear ConfigError, no process start-up); every rank loads it again
        ck_step = int(load_run_checkpoint(resume, "distributed", world=config.algorithm.workers, config=cfg)["step"])
        if config.schedule.max_steps is not None and ck_step > config.schedule.max_steps:
            raise ConfigError.invalid("max_steps", config.schedule.max_steps, f"the checkpoint is already at step {ck_step}")
        opts["resume"] = str(checkpoint_path(resume).resolve())
        done = finished_summary(out_dir, ck_step, problem.total_steps)
        if done is not None:  # a finished run resumed: nothing to do, nothing written
            return done
    if out_dir:  # a refused directory costs no process start-up; rank 0 removes the old run's files
        check_run_dir(out_dir, cfg, overwrite=overwrite, resume=resume is not None)
    tensorboard_enabled(config.output.tensorboard, has_dir=bool(out_dir))  # tensorboard=True without the package
    opts.update(checked=True, overwrite=overwrite, progress=progress, locked=bool(out_dir))
    created = first_missing(out_dir) if out_dir else None
    held = lock_directory(out_dir, "run directory") if out_dir else None  # one writer: this launch, for its ranks
    try:
        return _launch_run(config, cfg, opts, out_dir, timeout_s=timeout_s, backend=backend, env=env)
    finally:
        if held is not None:
            held.release()
            if created is not None:
                discard_unused(str(out_dir), created)  # a refused run leaves no directory of its own


def _launch_run(config: RunConfig, cfg: dict[str, Any], opts: dict[str, Any], out_dir: str | Path | None, *,
                timeout_s: float, backend: str | None, env: dict[str, str] | None) -> dict[str, Any]:
    """Launch the ranks of a checked run; a rank's failure or a signal recorded in the run directory."""
    try:
        results = launch(rank_main, config.algorithm.workers, (cfg, opts), timeout_s=timeout_s, backend=backend, env=env)
    except RankFailure as exc:
        if out_dir and exc.details.get("type") == "NonFiniteError":
            _record_divergence(Path(out_dir), str(exc.details.get("message", exc)))
        if exc.details.get("config_error"):  # bad input only a rank could see (a checkpoint's engine state)
            message = " ".join(str(exc.details.get("message", "")).split())
            raise ConfigError(f"rank {exc.rank}: {message}") from exc
        raise
    except Interrupted as exc:  # SIGTERM / SIGINT: the launcher has stopped every rank
        if out_dir:
            _record_interruption(Path(out_dir), exc)
        raise
    return results[0]


def _record_divergence(out_dir: Path, message: str) -> None:
    """A diverged run's ``summary.json`` (status ``"diverged"``), unless rank 0 wrote it before being stopped."""
    path = out_dir / "summary.json"
    try:
        if path.is_file() and json.loads(path.read_text()).get("status") == "diverged":
            return
    except (OSError, ValueError, AttributeError):  # unreadable or damaged: replaced below
        pass
    if out_dir.is_dir():
        atomic_write_json(path, {"status": "diverged", "error": message})


def _record_interruption(out_dir: Path, exc: Interrupted) -> None:
    """An interrupted run's ``summary.json`` (status ``"interrupted"``). The ranks are stopped by now, so
    nothing overwrites it; the last checkpoint is left as it is (written atomically, an interrupted write
    never replaced it), so ``--resume`` continues from there."""
    if out_dir.is_dir():
        atomic_write_json(out_dir / "summary.json",
                          {"status": "interrupted", "signal": exc.signal_name, "error": str(exc)})


def one_line(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's headline keys (what a torchrun rank 0 prints)."""
    keys = ("status", "preset", "workers", "steps", "final", "time_s", "time_source", "communication_rounds",
            "communication_fraction", "out")
    return {k: summary[k] for k in keys if k in summary}
