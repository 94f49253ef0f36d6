"""The engine contract: what every engine (reference, simulator, distributed) offers the training loop.

The data flow of a run (see ``docs/architecture.md``)::

    AlgorithmSpec (frozen) -> schedule run state -> training loop (coopsgd.train.loop)
        -> Engine (this protocol) -> round kernel (coopsgd.engines.kernel) -> Communicator

* :class:`Engine` -- one ``step(batches, lr)`` signature, one :class:`StepStats` record, one
  :meth:`Engine.state_dict` envelope (:func:`wrap_state` / :func:`unwrap_state`: a checkpoint says which
  engine wrote it), one rule for the centre model (:meth:`coopsgd.algorithms.spec.AlgorithmSpec.center_node`).
* :class:`Communicator` -- how a round (:func:`coopsgd.engines.mixing.plan_round`) reaches the rows a
  process holds: in-process for the simulator (:class:`coopsgd.engines.kernel.InProcess`), collectives
  derived from the same typed plan for the distributed engine (:class:`coopsgd.engines.distributed.communicator.Mixer`).

Nothing in ``coopsgd.engines`` imports ``coopsgd.train``, ``coopsgd.experiments`` or the CLI
(``tests/unit/test_layering.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor, nn

from coopsgd.algorithms.schedules import ScheduleState
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.mixing import Round
from coopsgd.errors import ConfigError, CoopSGDError

__all__ = [
    "Batch",
    "StepStats",
    "DroppedRound",
    "Engine",
    "ModelEngine",
    "Communicator",
    "NonFiniteError",
    "ENGINE_STATE_FORMAT",
    "ENGINE_NAMES",
    "wrap_state",
    "unwrap_state",
    "NAN_POLICIES",
]

Batch = tuple[Tensor, Tensor]

#: ``format`` tag of every engine's :meth:`Engine.state_dict` envelope.
ENGINE_STATE_FORMAT = "coopsgd-engine-state-v1"
#: The engines, by the name they write into their state envelope and into run records.
ENGINE_NAMES = ("reference", "simulate", "distributed")
#: What a non-finite loss, gradient or model does; the same meaning on every engine (see :class:`Engine`).
NAN_POLICIES = ("stop", "skip")


class NonFiniteError(CoopSGDError, FloatingPointError):
    """A worker's model or loss became NaN/Inf; the message names the worker(s) and the step(s).

    ``workers`` lists the workers found non-finite (empty when only an auxiliary node or the mixing matrix is).
    """

    def __init__(self, message: str, *, workers: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.workers = [int(w) for w in workers]


@dataclass(frozen=True)
class StepStats:
    """What one step did; the same record from every engine.

    Attributes:
        step: the 0-based step index.
        lr: its learning rate.
        losses: (m,) mini-batch loss of each worker this process runs (NaN for inactive workers and, on
            the distributed engine, for the workers of other ranks; the reference engine reports the
            objective at each worker's model).
        communicated: whether the step ended with a communication round.
        round: communication rounds so far (after this step).
        pattern: the mix's communication pattern (``None`` without a mix).
        bytes_sent: bytes sent in this step: the alpha-beta model's busiest link (simulator), or the bytes
            this rank put on the wire (distributed).
        info: the schedule's facts (LSGD leader, FedAvg clients, DOWNPOUR order, ...).
        sim_time: the simulated clock after the step (0.0 for engines without a simulated clock).
        compute_s, communication_s, idle_s: this step's increments of the simulated clock's totals.
        estimates: the loss estimates given to the schedule (LSGD), else ``None``.
        skipped: under ``nan_policy="skip"``, True when this process saw a non-finite value in this step
            (the step did not update; the loop drops the round at the next health check).
    """

    step: int
    lr: float
    losses: np.ndarray
    communicated: bool
    round: int
    pattern: str | None
    bytes_sent: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    sim_time: float = 0.0
    compute_s: float = 0.0
    communication_s: float = 0.0
    idle_s: float = 0.0
    estimates: np.ndarray | None = None
    skipped: bool = False

    @property
    def loss(self) -> float:
        """Mean mini-batch loss over the workers with a finite loss this step (NaN if none)."""
        vals = self.losses[np.isfinite(self.losses)]
        return float(vals.mean()) if vals.size else float("nan")


@dataclass(frozen=True)
class DroppedRound:
    """A round dropped under ``nan_policy="skip"``: which workers went non-finite, at which steps, and the
    step whose state was restored."""

    step: int
    workers: list[int]
    first_steps: dict[str, int]
    restored_to_step: int

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "workers": list(self.workers), "first_steps": dict(self.first_steps),
                "restored_to_step": self.restored_to_step}


@runtime_checkable
class Communicator(Protocol):
    """How a round reaches the rows one process holds: the one contract between the round kernel
    (:class:`coopsgd.engines.kernel.RoundKernel`) and a transport. ``rows`` is the column range the round
    mixes: every node for the simulator (:class:`coopsgd.engines.kernel.InProcess`), this rank's worker
    then the auxiliaries it holds for the distributed engine (:class:`coopsgd.engines.distributed.communicator.Mixer`).

    A round is a :class:`~coopsgd.engines.mixing.Round` from the one planner,
    :func:`~coopsgd.engines.mixing.plan_round`: its typed structure (:class:`~coopsgd.engines.mixing.RoundKind`:
    identity, average -- FedAvg's ``Averaging`` included --, sparse gossip, push chain, dense; the rows it
    touches, its weights) and the Mix it came from. Each communicator derives how to move the data from
    that plan (in process: a fused in-place kernel; torch.distributed: all-reduce, neighbour exchange,
    broadcast, subgroups, non-blocking overlap); the kernel never asks which communicator it holds.

    The round has three stages, and a compressor sits between the first two and the last::

        select   what each node sends (its row, or the weighted share of a reduction), from the plan
        [encode -> transport -> decode]   uncompressed: the identity codec, fused with the transport
        combine  the received rows with the plan's weights (plus each node's own term)

    A spec with compression (``spec.compressed``, SPEC §11) puts its compressor at the middle stage: in
    process, :class:`coopsgd.engines.compressed.CompressedRounds` selects what each node sends (x_i − x_ref
    + e_i in averaging rounds, x_i − x̂_i in CHOCO gossip), encodes and decodes every sending row at once and
    combines the decoded payloads, handing the rounds it does not compress to the communicator.

    Attributes:
        pending: a non-blocking round is still in flight (completed by :meth:`finalize`).
    """

    @property
    def pending(self) -> bool: ...

    def communicate(self, rows: Tensor, rnd: Round, *, overlap: bool = False) -> None:
        """Replace ``rows`` by their columns of ``X S`` for the round ``rnd`` (in place). With ``overlap`` a
        communicator may complete the auxiliaries' part later (:meth:`finalize`)."""
        ...

    def finalize(self) -> None:
        """Complete a pending non-blocking round."""
        ...

    def gather_floats(self, values: np.ndarray | float) -> np.ndarray:
        """Every process's small float vector, (processes, k) (LSGD's loss estimates, health flags)."""
        ...


@runtime_checkable
class Engine(Protocol):
    """What the training loop (:mod:`coopsgd.train.loop`) needs from an engine.

    The loop owns the step counter's meaning, the learning rate, the data order, evaluation, checkpoints
    and the NaN policy; an engine executes steps of ``spec`` on the workers it runs.

    NaN policy (``nan_policy``, the same on every engine): ``"stop"`` -- a non-finite loss, gradient or
    model raises :class:`NonFiniteError` naming the worker and the step. ``"skip"`` -- the worker stops
    updating; at the next :meth:`check_health` (the loop calls it after every communication round, before
    every evaluation and checkpoint, and at the end) the steps since the last good round are dropped on
    every worker: models, auxiliaries, momentum and buffers return to the state after that round; the
    data of the dropped steps is not reused; step and round counters move on.
    """

    name: str
    spec: AlgorithmSpec
    step_count: int
    rounds: int
    leader: int | None
    schedule_state: ScheduleState

    @property
    def local_workers(self) -> Sequence[int]:
        """The workers whose batches this process feeds (all m in one process; one per distributed rank)."""
        ...

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run's files (the simulator; rank 0 of the distributed engine)."""
        ...

    def step(self, batches: Sequence[Batch | None] | None, lr: float) -> StepStats: ...

    def check_health(self) -> DroppedRound | None: ...

    def finish(self) -> None: ...

    def center_node(self) -> int | None: ...

    def reduce_losses(self, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ModelEngine(Engine, Protocol):
    """An engine of ``nn.Module`` workers (simulator, distributed): the views a neural-network evaluation
    reads. On the distributed engine each is a collective (every rank calls it)."""

    def center_model(self) -> nn.Module: ...

    def average_model(self) -> nn.Module: ...

    def consensus_distance(self) -> float: ...

    def time_record(self, *, local: bool = False) -> dict[str, Any]: ...

    def async_record(self) -> dict[str, Any]:
        """An asynchronous server's staleness statistics for the metric records (empty for other algorithms)."""
        ...


def wrap_state(engine: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The one envelope of an engine state: ``{"format", "engine", "payload"}``."""
    if engine not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {engine!r}")
    return {"format": ENGINE_STATE_FORMAT, "engine": engine, "payload": payload}


def unwrap_state(state: Any, engine: str, *, what: str = "state_dict") -> dict[str, Any]:
    """The payload of an envelope written by ``engine``; a clear error for anything else."""
    if not isinstance(state, dict) or state.get("format") != ENGINE_STATE_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError.invalid(f"{what}.format", got, f"expected {ENGINE_STATE_FORMAT!r} (an engine state_dict())")
    if state.get("engine") != engine:
        raise ConfigError.invalid(f"{what}.engine", state.get("engine"),
                                  f"this state was written by the {state.get('engine')!r} engine; "
                                  f"it cannot be loaded into the {engine!r} engine")
    payload = state.get("payload")
    if not isinstance(payload, dict):
        raise ConfigError.invalid(f"{what}.payload", type(payload).__name__, "must be a mapping")
    return payload
