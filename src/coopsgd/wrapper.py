"""A few lines around your own model and optimizer: Cooperative SGD in your own training loop.

Launch one process per worker (``torchrun --nproc-per-node M train.py``) and::

    import torch.distributed as dist
    import coopsgd
    from coopsgd.wrapper import CooperativeSGD

    dist.init_process_group("gloo")                      # "nccl" on GPUs
    model = Net(); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = coopsgd.algorithms.local_sgd(dist.get_world_size(), tau=8)
    with CooperativeSGD(model, opt, spec=spec) as coop:
        for x, y in loader:
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()
            coop.step(loss=loss.item())      # communicates when the schedule says so
        center = coop.load_center(Net())     # read the centre model inside the block (collective)

Lifetime. The ``with`` block is optional: without it the wrapper works as before for as long as it is
referenced (call :meth:`CooperativeSGD.finalize` before reading auxiliaries). Leaving the block calls
:meth:`CooperativeSGD.close`: it completes a pending non-blocking round, then gives every parameter (and
mixed buffer) its own storage again, so the model is an ordinary module afterwards (same values, the
optimizer keeps working on it) and the wrapper's flat rows -- the worker row and the auxiliaries -- are
released. After that, :meth:`~CooperativeSGD.step` and the reads of auxiliaries or the centre model raise
:class:`~coopsgd.errors.ConfigError`; ``stats``, ``rounds``, ``step_count`` and ``leader`` stay readable.

Communicator. By default the wrapper builds the distributed engine's :class:`~coopsgd.engines.distributed.communicator.Mixer`
on the initialised process group (``group``, default the world): the rank and the world size come from
``torch.distributed``. Any object satisfying :class:`WrapperCommunicator` may be passed instead
(``communicator=``): the rank and the world size then come from the communicator (its ``rank`` and
``m``), every collective the wrapper issues goes through it, and no process group is needed at all
(e.g. an in-process fake for unit tests, or a communicator over another transport).

Semantics. Step k of the framework ([CSGD] eq. (10)) is ``X_{k+1} = (X_k - lr G_k) S_k`` ("post_mix"):
your ``opt.step()`` is the local update and ``coop.step()`` applies the round ``S_k`` to the model right
after it -- exactly the simulator's iterates for post_mix presets (sync, local_sgd, dpsgd,
decentralized_periodic, fedavg, downpour) with plain SGD, momentum kept local.

Pre-mix presets (easgd, generalized_elastic, hierarchical, lsgd) are defined as ``X_{k+1} = X_k S_k -
lr G_k``. Called after ``opt.step()``, ``coop.step()`` applies them as "mix after the step", i.e.
``(X_k - lr G_k) S_k``: the gradient is still taken at ``X_k``, but the step ``-lr G_k`` is also mixed
(for EASGD, a fraction alpha of it moves to z one round early). The two forms differ by O(lr * alpha *
|G|) per round and have the same fixed points; for the exact pre-mix iterates call
``coop.step(loss=...)`` *between* ``loss.backward()`` and ``opt.step()`` (the gradient is already taken
at ``X_k``; ``opt.step()`` then subtracts it from the mixed model) -- exact for SGD without weight decay
(with weight decay torch adds ``wd * x`` at the mixed x).

FedAvg samples clients: call :meth:`CooperativeSGD.is_active` before the local step and skip
``opt.step()`` when it is False (still call ``coop.step()``: every rank takes part in every round).
LSGD elects its leader from the ``loss`` you pass (running mean of the last ``window`` values) and uses
the optimizer's current learning rate for the pull strength ``lr * lam``.

Communication is the distributed engine's (:mod:`coopsgd.engines.distributed.communicator`): the parameters (and, with the
``buffers="mix"`` policy, the float buffers such as BatchNorm statistics) live in ONE flat buffer (the
wrapper rebinds ``p.data`` to views into it at construction, as DDP does for gradient buckets), which a
round mixes in place -- never one collective per parameter, no copies. Create the wrapper after moving
the model to its device; if you later rebind the tensors (``model.to(...)``), rounds fall back to
flatten / copy back. Auxiliary nodes live on the ranks that read them (see
:func:`~coopsgd.engines.distributed.communicator.aux_placement`). Optimizer
state policies: ``"local"`` (default) and ``"reset"`` (momentum buffers zeroed after each round);
``"mix"`` is not supported by the wrapper (use the engine).

Compression (SPEC §11, ``compression=`` on the preset): the rounds of a compressed spec go through the
distributed engine's :class:`~coopsgd.engines.distributed.compressed.CompressedMixer` -- averaging rounds send
Q(x_i − x_ref + e_i) (all-gather or the sampled clients' broadcasts), gossip rounds run CHOCO-SGD
(point-to-point to the neighbours) -- so the wrapped models are the simulator's iterates and the bytes on
the wire are the payloads; elastic rounds (EASGD, generalized elastic), LSGD's leader refresh and DOWNPOUR's
pushes as on the engine (hierarchical's placed centres too). Pass the same ``seed`` on every rank (it keys
``qsgd`` / ``randk`` draws). An injected communicator that cannot move packed payloads is refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from coopsgd.algorithms.schedules import MixContext
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.base import Communicator
from coopsgd.engines.distributed.communicator import CommStats, Mixer, NetEmulation, aux_placement
from coopsgd.engines.distributed.compressed import (
    CompressedMixer,
    average_start,
    check_distributed_compression,
)
from coopsgd.engines.mixing import plan_round
from coopsgd.errors import ConfigError, check_int

__all__ = ["CooperativeSGD", "WrapperCommunicator"]


@runtime_checkable
class WrapperCommunicator(Communicator, Protocol):
    """What :class:`CooperativeSGD` needs from its communicator: the engines' :class:`Communicator`
    (``pending``, ``communicate``, ``finalize``, ``gather_floats``) plus the few collectives and facts of
    placement the wrapper uses. :class:`coopsgd.engines.distributed.communicator.Mixer` satisfies it.

    Rows passed to :meth:`communicate` are ``(1 + v, width)``: ``rows[0]`` this rank's worker, ``rows[1:]`` the
    auxiliaries (only those this rank :meth:`holds` are kept current). Every method except ``holds``,
    ``host`` and ``pending`` is collective: every rank calls it, in the same order.
    """

    @property
    def rank(self) -> int:
        """This process's rank; worker ``i`` lives on rank ``i``."""
        ...

    @property
    def m(self) -> int:
        """The world size: the number of workers (one per rank)."""
        ...

    @property
    def stats(self) -> CommStats:
        """Bytes and seconds this rank spent communicating."""
        ...

    def broadcast(self, t: Tensor, src: int) -> None:
        """Overwrite ``t`` on every rank with rank ``src``'s ``t``."""
        ...

    def all_reduce(self, t: Tensor) -> None:
        """Replace ``t`` by its sum over every rank."""
        ...

    def holds(self, aux: int) -> bool:
        """Whether this rank keeps auxiliary ``aux`` current."""
        ...

    def host(self, aux: int) -> int:
        """The rank that reports auxiliary ``aux``."""
        ...

    def collect_aux(self, Z: Tensor) -> Tensor:
        """Every auxiliary's current row (v, width) on every rank; ``Z`` is this rank's (v, width) rows."""
        ...


#: The members a :class:`WrapperCommunicator` must have (named in the error for an incomplete one).
_PROTOCOL_MEMBERS = ("rank", "m", "stats", "pending", "communicate", "finalize", "gather_floats", "broadcast",
                     "all_reduce", "holds", "host", "collect_aux")


def _check_arguments(model: Any, optimizer: Any, spec: Any) -> None:
    """The wrapper's model, optimizer and spec, each checked with an error naming it."""
    if not isinstance(spec, AlgorithmSpec):
        raise ConfigError.invalid("spec", spec, "must be an AlgorithmSpec (e.g. coopsgd.algorithms.local_sgd(m, tau=8))")
    if not isinstance(model, nn.Module):
        raise ConfigError.invalid("model", type(model).__name__, "must be a torch.nn.Module")
    if optimizer is not None and not hasattr(optimizer, "param_groups"):
        raise ConfigError.invalid("optimizer", type(optimizer).__name__, "must be a torch.optim.Optimizer or None")
    if spec.policies.optimizer_state == "mix":
        raise ConfigError.invalid("optimizer_state", "mix", "the wrapper supports 'local' and 'reset'")
    if spec.outer is not None:
        raise ConfigError.invalid("spec.outer", spec.outer.kind, "the wrapper runs no outer optimizer (DiLoCo, "
                                  "SlowMo); use the simulator or the distributed engine")
    if spec.asynchronous is not None:
        raise ConfigError.invalid("spec.asynchronous", spec.name, "the wrapper runs no asynchronous server (FedBuff, "
                                  "asynchronous local SGD); use the simulator, the reference or the distributed engine")
    if spec.prox > 0.0 or spec.control:  # never a silent FedAvg in place of FedProx / SCAFFOLD
        raise ConfigError.invalid("spec.prox" if spec.prox > 0.0 else "spec.control", spec.prox or spec.control,
                                  "the wrapper steps your optimizer on its own gradients: FedProx's term and SCAFFOLD's "
                                  "control variates need the simulator or the distributed engine")
    check_distributed_compression(spec)  # what cannot be compressed: refused, never a silent uncompressed run


def _rank_and_world(communicator: Any, group: Any, net_latency_ms: float | None,
                    net_bandwidth_mbps: float | None) -> tuple[int, int, str]:
    """This rank, the world size and how the error for a mismatching spec names it: from the process group
    (default communicator) or from an injected communicator (which then owns the network settings)."""
    if communicator is None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError.invalid("process group", None,
                                      "call torch.distributed.init_process_group first (or pass communicator=)")
        return dist.get_rank(group), dist.get_world_size(group), "the world size"
    if not isinstance(communicator, WrapperCommunicator):
        missing = [n for n in _PROTOCOL_MEMBERS if not hasattr(communicator, n)]
        raise ConfigError.invalid("communicator", type(communicator).__name__,
                                  f"must implement WrapperCommunicator (missing: {', '.join(missing)})")
    for name, value in (("group", group), ("net_latency_ms", net_latency_ms),
                        ("net_bandwidth_mbps", net_bandwidth_mbps)):
        if value is not None:
            raise ConfigError.invalid(name, value, "applies only to the default communicator; "
                                                   "configure the injected communicator instead")
    world = check_int("communicator.m", communicator.m, minimum=1)
    rank = check_int("communicator.rank", communicator.rank, minimum=0, maximum=world - 1)
    return rank, world, "the communicator's world size m"


class CooperativeSGD:
    """Cooperative SGD around a user's ``nn.Module`` and optimizer (one process per worker).

    Use it as a context manager (``with CooperativeSGD(...) as coop:``; leaving the block calls
    :meth:`close`) or as a plain object (then nothing is released until it is garbage collected).

    Args:
        model: this worker's model.
        optimizer: its optimizer (used for the learning rate of LSGD's pull and the ``"reset"`` policy);
            may be ``None``, then pass ``lr`` to :meth:`step` for LSGD.
        spec: the algorithm; ``spec.workers`` must equal the world size.
        net_latency_ms, net_bandwidth_mbps: emulate slow links (see :class:`~coopsgd.engines.distributed.communicator.NetEmulation`);
            only for the default communicator.
        sync_init: broadcast rank 0's model at construction so every worker starts from the same point.
        window: LSGD running-mean window of the passed losses.
        group: process group (default: the world); only for the default communicator. With the world,
            auxiliaries that only some workers read (hierarchical averaging's group auxiliaries) live only
            on those ranks and their rounds run in process subgroups; with another group every rank holds
            every auxiliary.
        communicator: a :class:`WrapperCommunicator` to use instead of building a
            :class:`~coopsgd.engines.distributed.communicator.Mixer`. The rank and the world size are then the communicator's
            ``rank`` and ``m``, and ``torch.distributed`` is not used at all (no process group needed). A
            compressed spec needs it to move packed payloads too
            (:data:`~coopsgd.engines.distributed.compressed.TRANSPORT_METHODS`, as the Mixer does).
        seed: the run's seed, the same on every rank: it keys the compressors' draws (``qsgd``, ``randk``,
            PowerSGD's first factor) of a compressed spec.

    Attributes:
        mixer: the communicator (the injected one, or the :class:`~coopsgd.engines.distributed.communicator.Mixer` built).
        compression: a compressed spec's rounds (:class:`~coopsgd.engines.distributed.compressed.CompressedMixer`
            around the communicator; its ``state_dict()`` / ``load_state_dict()`` hold this rank's residuals,
            public copies, x_ref and round count for a checkpoint), else ``None``.
        rank, m, v: this rank, the number of workers and of auxiliaries.
        step_count, rounds, leader: steps taken, communicating rounds so far, LSGD's current leader.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        spec: AlgorithmSpec,
        net_latency_ms: float | None = None,
        net_bandwidth_mbps: float | None = None,
        sync_init: bool = True,
        window: int = 10,
        group: Any = None,
        communicator: WrapperCommunicator | None = None,
        seed: int = 0,
    ) -> None:
        _check_arguments(model, optimizer, spec)
        self.window = check_int("window", window, minimum=1)
        rank, world, what = _rank_and_world(communicator, group, net_latency_ms, net_bandwidth_mbps)
        if spec.workers != world:
            raise ConfigError.invalid("spec.workers", spec.workers, f"must equal {what} ({world})")
        params = list(model.parameters())
        if not params:
            raise ConfigError.invalid("model", type(model).__name__, "has no parameters")
        self.model = model
        self.optimizer = optimizer
        self.spec = spec
        self.rank = rank
        self.m, self.v = spec.workers, spec.auxiliaries
        self._params = params
        self._buffers = (
            [t for t in model.buffers() if t.is_floating_point()] if spec.policies.buffers == "mix" else []
        )
        self._tensors = self._params + self._buffers
        first = self._params[0]
        self.dtype, self.device = first.dtype, first.device
        self.width = int(sum(t.numel() for t in self._tensors))
        if communicator is None:
            holders = aux_placement(spec) if group is None else None
            communicator = Mixer(
                rank, self.m, self.v, net=NetEmulation(net_latency_ms, net_bandwidth_mbps), group=group,
                holders=holders, matrices=spec.schedule.matrices(4096) if holders is not None else None,
            )
        self.mixer: WrapperCommunicator = communicator
        self._uncounted = CommStats()  # the communicator's stats of the wrapper's non-round collectives
        rows = torch.zeros((1 + self.v, self.width), dtype=self.dtype, device=self.device)
        self._rows: Tensor | None = rows
        self._flatten_into(rows[0])
        if sync_init:
            with self._not_counted():
                self.mixer.broadcast(rows[0], 0)
            self._unflatten_from(rows[0])
        rows[1:] = rows[0]
        self.compression = self._compression_stage(rows[0], sync_init, check_int("seed", seed))
        self._ptrs: list[int] = []
        self._bind(rows[0])
        self.step_count = 0
        self.rounds = 0
        self.leader: int | None = None
        self.schedule_state = spec.schedule.init_state()
        self._hist: list[float] = []

    def _compression_stage(self, row: Tensor, common_start: bool, seed: int) -> CompressedMixer | None:
        """A compressed spec's rounds (the distributed engine's, SPEC §11): a node sends its flat row, whose
        tensors' shapes are the layout PowerSGD reads; x_ref starts at the common start (the workers' mean
        without ``sync_init``: one all_reduce, not counted)."""
        comp = self.spec.compressed
        if comp is None:
            return None
        with self._not_counted():
            start = average_start(row, not common_start, self.mixer.all_reduce, self.m)
        return CompressedMixer(self.mixer, comp, spec=self.spec, width=self.width,
                               params=sum(p.numel() for p in self._params), dtype=self.dtype, device=self.device,
                               seed=seed, layout=[tuple(t.shape) for t in self._tensors], start=start)

    # -- lifetime -----------------------------------------------------------------------------------------
    def __enter__(self) -> CooperativeSGD:
        self._live_rows()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # leaving on an error: still release the model; an error of the pending round must not hide it
        with contextlib.suppress(Exception):  # close() releases the rows even when finalize() raises
            self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (the flat rows are released; the model owns its tensors again)."""
        return self._rows is None

    @property
    def communicator(self) -> WrapperCommunicator:
        """The communicator (same object as :attr:`mixer`)."""
        return self.mixer

    def close(self) -> None:
        """Complete a pending non-blocking round, then release the flat rows (idempotent).

        Every parameter (and mixed buffer) gets its own storage holding its current value, so the model
        stays usable as an ordinary module and the optimizer keeps working on it. Collective when a
        round is pending (call it on every rank, as leaving the ``with`` block does).
        """
        if self._rows is None:
            return
        try:
            self.mixer.finalize()
        finally:
            self._release()

    @torch.no_grad()
    def _release(self) -> None:
        if self._rows is None:
            return
        for t, p in zip(self._tensors, self._ptrs, strict=False):
            if t.data_ptr() == p:  # still a view into the flat row: give it its own storage
                t.data = t.data.clone()
        self._ptrs = []
        self._rows = None

    def _live_rows(self) -> Tensor:
        if self._rows is None:
            raise ConfigError.invalid("CooperativeSGD", "closed",
                                      "the wrapper was closed (its `with` block ended); "
                                      "step and read the centre model inside the block")
        return self._rows

    # -- flat buffer <-> model --------------------------------------------------------------------------
    @torch.no_grad()
    def _flatten_into(self, row: Tensor) -> None:
        torch.cat([t.detach().reshape(-1).to(self.dtype) for t in self._tensors], out=row)

    @torch.no_grad()
    def _unflatten_from(self, row: Tensor) -> None:
        o = 0
        for t in self._tensors:
            n = t.numel()
            t.copy_(row[o : o + n].view_as(t))
            o += n

    @torch.no_grad()
    def _bind(self, row: Tensor) -> None:
        """Make the parameters (and mixed buffers) views into the flat row, so a round needs no copies.

        Like DDP's gradient buckets: the model's tensors share one flat buffer; the mixing writes it in
        place. Skipped when the tensors have different dtypes/devices (then each round copies).
        """
        self._ptrs = []
        if any(t.dtype != self.dtype or t.device != self.device for t in self._tensors):
            return
        o = 0
        for t in self._tensors:
            n = t.numel()
            t.data = row[o : o + n].view_as(t)
            o += n
        self._ptrs = [t.data_ptr() for t in self._tensors]

    def _bound(self) -> bool:
        """Whether the model's tensors still view the flat row (``model.to(...)`` would break it)."""
        return bool(self._ptrs) and all(t.data_ptr() == p for t, p in zip(self._tensors, self._ptrs, strict=True))

    # -- public API ---------------------------------------------------------------------------------------
    def is_active(self) -> bool:
        """Whether this worker computes a local update in the current step (False for unsampled FedAvg clients)."""
        mask = self.spec.schedule.active(self.step_count)
        return mask is None or bool(mask[self.rank])

    def _lr(self, lr: float | None) -> float:
        if lr is not None:
            return float(lr)
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return 0.0

    @torch.no_grad()
    def step(self, loss: float | Tensor | None = None, *, lr: float | None = None) -> bool:
        """Apply the round ``S_k`` of the current step (if any); returns True when it communicated.

        ``loss`` (this step's mini-batch loss) is required by LSGD's leader election and ignored otherwise.
        """
        rows = self._live_rows()
        spec, k = self.spec, self.step_count
        sched = spec.schedule
        losses = None
        if spec.needs_losses:
            if loss is not None:
                val = float(loss.detach().item() if isinstance(loss, Tensor) else loss)
                if math.isfinite(val):
                    self._hist = (self._hist + [val])[-self.window :]
            if sched.wants_losses(k, self.schedule_state):
                est = float(np.mean(self._hist)) if self._hist else math.nan
                losses = self.mixer.gather_floats(est)[:, 0]
                if not np.all(np.isfinite(losses)):
                    bad = int(np.flatnonzero(~np.isfinite(losses))[0])
                    raise ConfigError.invalid("loss", losses[bad], f"LSGD needs a finite loss from every rank (rank {bad})")
        mix, self.schedule_state = sched.advance(k, MixContext(step=k, lr=self._lr(lr), losses=losses),
                                                 self.schedule_state)
        self.step_count += 1
        if mix is None:
            return False
        if "leader" in mix.info:
            self.leader = int(mix.info["leader"])
        bound = self._bound()
        if not bound:
            self._flatten_into(rows[0])
        comm = self.mixer if self.compression is None else self.compression
        comm.communicate(rows, plan_round(mix), overlap=spec.overlap)
        if not bound:
            self._unflatten_from(rows[0])
        if mix.communicates:
            self.rounds += 1
            if spec.policies.optimizer_state == "reset" and self.optimizer is not None:
                for state in self.optimizer.state.values():
                    buf = state.get("momentum_buffer")
                    if isinstance(buf, Tensor):
                        buf.zero_()
        return mix.communicates

    def finalize(self) -> None:
        """Complete a pending non-blocking round (call before reading auxiliaries at the end of training)."""
        self.mixer.finalize()

    def aux_vector(self, j: int = 0) -> Tensor:
        """Auxiliary node ``j``'s flat vector (z, the server model, a leader copy)."""
        rows = self._live_rows()
        j = check_int("j", j, minimum=0, maximum=max(self.v - 1, 0))
        if not self.mixer.holds(j):
            raise ConfigError.invalid("j", j, f"auxiliary {j} is not held by rank {self.rank} "
                                              f"(rank {self.mixer.host(j)} reports it; use gather_aux())")
        self.finalize()
        return rows[1 + j].clone()

    def gather_aux(self) -> Tensor:
        """Every auxiliary's flat vector, (v, width), on every rank (collective: call on every rank)."""
        return self.mixer.collect_aux(self._live_rows()[1:])

    @torch.no_grad()
    def center_vector(self) -> Tensor:
        """The flat centre model: workers' average, auxiliary 0, or the leader (collective: call on every rank)."""
        rows = self._live_rows()
        self.finalize()
        estimates = None
        if self.spec.center == "leader" and self.leader is None:  # before the first election (collective)
            estimates = self.mixer.gather_floats(float(np.mean(self._hist)) if self._hist else math.nan)[:, 0]
        node = self.spec.center_node(self.leader, estimates)
        if node is not None and node >= self.m:
            return rows[1 + node - self.m].clone()
        t = torch.empty(self.width, dtype=self.dtype, device=self.device)
        self._flatten_into(t)  # (a copy: the row itself is the live model)
        with self._not_counted():
            if node is not None:
                self.mixer.broadcast(t, node)
                return t
            self.mixer.all_reduce(t)
        return t / self.m

    @torch.no_grad()
    def load_center(self, module: nn.Module) -> nn.Module:
        """Copy the centre model (collective) into ``module`` (same architecture as the wrapped model)."""
        vec = self.center_vector()
        tensors = list(module.parameters()) + (
            [t for t in module.buffers() if t.is_floating_point()] if self._buffers else []
        )
        o = 0
        for t in tensors:
            n = t.numel()
            t.copy_(vec[o : o + n].view_as(t))
            o += n
        return module

    @contextlib.contextmanager
    def _not_counted(self) -> Iterator[None]:
        """Leave the collectives inside out of :attr:`stats` (the initial broadcast, the centre reads)."""
        s = self.mixer.stats
        bytes_sent, comm_s, emulated_s, ops = s.bytes_sent, s.comm_s, s.emulated_s, dict(s.ops)
        try:
            yield
        finally:
            s, u = self.mixer.stats, self._uncounted
            u.bytes_sent += s.bytes_sent - bytes_sent
            u.comm_s += s.comm_s - comm_s
            u.emulated_s += s.emulated_s - emulated_s
            for kind, n in s.ops.items():
                u.ops[kind] = u.ops.get(kind, 0) + n - ops.get(kind, 0)

    @property
    def stats(self) -> dict[str, Any]:
        """Rounds, bytes and seconds spent communicating on this rank: the rounds and LSGD's loss gathers
        (the initial broadcast and the centre-model reads are not counted)."""
        s, u = self.mixer.stats, self._uncounted
        ops = {kind: n - u.ops.get(kind, 0) for kind, n in s.ops.items()}
        return {"rounds": self.rounds, "bytes_sent": s.bytes_sent - u.bytes_sent,
                "communication_s": s.comm_s - u.comm_s, "emulated_delay_s": s.emulated_s - u.emulated_s,
                "ops": {k: n for k, n in ops.items() if n}}

