"""A few lines around your own model and optimizer: Cooperative SGD in your own training loop.

Launch one process per worker (``torchrun --nproc-per-node M train.py``) and::

    import torch.distributed as dist
    import coopsgd
    from coopsgd.wrapper import CooperativeSGD

    dist.init_process_group("gloo")                      # "nccl" on GPUs
    model = Net(); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    coop = CooperativeSGD(model, opt, spec=coopsgd.algorithms.local_sgd(dist.get_world_size(), tau=8))
    for x, y in loader:
        opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()
        coop.step(loss=loss.item())      # communicates when the schedule says so

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

Communication is the distributed engine's (:mod:`coopsgd.engines.comm`): the parameters (and, with the
``buffers="mix"`` policy, the float buffers such as BatchNorm statistics) live in ONE flat buffer (the
wrapper rebinds ``p.data`` to views into it at construction, as DDP does for gradient buckets), which a
round mixes in place -- never one collective per parameter, no copies. Create the wrapper after moving
the model to its device; if you later rebind the tensors (``model.to(...)``), rounds fall back to
flatten / copy back. Auxiliary nodes are replicated on every rank. Optimizer
state policies: ``"local"`` (default) and ``"reset"`` (momentum buffers zeroed after each round);
``"mix"`` is not supported by the wrapper (use the engine).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from coopsgd.algorithms.schedules import MixContext
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.comm import Mixer, NetEmulation, aux_placement
from coopsgd.errors import ConfigError, check_int

__all__ = ["CooperativeSGD"]


class CooperativeSGD:
    """Cooperative SGD around a user's ``nn.Module`` and optimizer (one process per worker).

    Args:
        model: this worker's model.
        optimizer: its optimizer (used for the learning rate of LSGD's pull and the ``"reset"`` policy);
            may be ``None``, then pass ``lr`` to :meth:`step` for LSGD.
        spec: the algorithm; ``spec.workers`` must equal the world size.
        net_latency_ms, net_bandwidth_mbps: emulate slow links (see :class:`~coopsgd.engines.comm.NetEmulation`).
        sync_init: broadcast rank 0's model at construction so every worker starts from the same point.
        window: LSGD running-mean window of the passed losses.
        group: process group (default: the world). With the world, auxiliaries that only some workers read
            (hierarchical averaging's group auxiliaries) live only on those ranks and their rounds run in
            process subgroups; with another group every rank holds every auxiliary.
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
    ) -> None:
        if not isinstance(spec, AlgorithmSpec):
            raise ConfigError.invalid("spec", spec, "must be an AlgorithmSpec (e.g. coopsgd.algorithms.local_sgd(m, tau=8))")
        if not isinstance(model, nn.Module):
            raise ConfigError.invalid("model", type(model).__name__, "must be a torch.nn.Module")
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError.invalid("process group", None, "call torch.distributed.init_process_group first")
        world = dist.get_world_size(group)
        if spec.workers != world:
            raise ConfigError.invalid("spec.workers", spec.workers, f"must equal the world size ({world})")
        if spec.policies.optimizer_state == "mix":
            raise ConfigError.invalid("optimizer_state", "mix", "the wrapper supports 'local' and 'reset'")
        self.model = model
        self.optimizer = optimizer
        self.spec = spec
        self.rank = dist.get_rank(group)
        self.m, self.v = spec.workers, spec.auxiliaries
        self.window = check_int("window", window, minimum=1)
        self._params = list(model.parameters())
        if not self._params:
            raise ConfigError.invalid("model", type(model).__name__, "has no parameters")
        self._buffers = (
            [t for t in model.buffers() if t.is_floating_point()] if spec.policies.buffers == "mix" else []
        )
        self._tensors = self._params + self._buffers
        first = self._params[0]
        self.dtype, self.device = first.dtype, first.device
        self.width = int(sum(t.numel() for t in self._tensors))
        self._rows = torch.zeros((1 + self.v, self.width), dtype=self.dtype, device=self.device)
        self._flatten_into(self._rows[0])
        if sync_init:
            dist.broadcast(self._rows[0], src=0, group=group)
            self._unflatten_from(self._rows[0])
        self._rows[1:] = self._rows[0]
        self._bind()
        holders = aux_placement(spec) if group is None else None
        self.mixer = Mixer(
            self.rank, self.m, self.v, net=NetEmulation(net_latency_ms, net_bandwidth_mbps), group=group,
            holders=holders, matrices=spec.schedule.matrices(4096) if holders is not None else None,
        )
        self.step_count = 0
        self.rounds = 0
        self.leader: int | None = None
        self.schedule_state = spec.schedule.init_state()
        self._hist: list[float] = []

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
    def _bind(self) -> None:
        """Make the parameters (and mixed buffers) views into the flat row, so a round needs no copies.

        Like DDP's gradient buckets: the model's tensors share one flat buffer; the mixing writes it in
        place. Skipped when the tensors have different dtypes/devices (then each round copies).
        """
        self._ptrs: list[int] = []
        if any(t.dtype != self.dtype or t.device != self.device for t in self._tensors):
            return
        row = self._rows[0]
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
            self._flatten_into(self._rows[0])
        self.mixer.mix(self._rows, mix.matrix, overlap=spec.overlap)
        if not bound:
            self._unflatten_from(self._rows[0])
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
        j = check_int("j", j, minimum=0, maximum=max(self.v - 1, 0))
        if not self.mixer.holds(j):
            raise ConfigError.invalid("j", j, f"auxiliary {j} is held by ranks {list(self.mixer.holders[j])}, "
                                              f"not by rank {self.rank}")
        self.finalize()
        return self._rows[1 + j].clone()

    def gather_aux(self) -> Tensor:
        """Every auxiliary's flat vector, (v, width), on every rank (collective: call on every rank)."""
        return self.mixer.collect_aux(self._rows[1:])

    @torch.no_grad()
    def center_vector(self) -> Tensor:
        """The flat centre model: workers' average, auxiliary 0, or the leader (collective: call on every rank)."""
        self.finalize()
        estimates = None
        if self.spec.center == "leader" and self.leader is None:  # before the first election (collective)
            estimates = self.mixer.gather_floats(float(np.mean(self._hist)) if self._hist else math.nan)[:, 0]
        node = self.spec.center_node(self.leader, estimates)
        if node is not None and node >= self.m:
            return self._rows[1 + node - self.m].clone()
        t = torch.empty(self.width, dtype=self.dtype, device=self.device)
        self._flatten_into(t)  # (a copy: the row itself is the live model)
        if node is not None:
            dist.broadcast(t, src=node, group=self.mixer.group)
            return t
        dist.all_reduce(t, group=self.mixer.group)
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

    @property
    def stats(self) -> dict[str, Any]:
        """Rounds, bytes and seconds spent communicating on this rank."""
        s = self.mixer.stats
        return {"rounds": self.rounds, "bytes_sent": s.bytes_sent, "communication_s": s.comm_s,
                "emulated_delay_s": s.emulated_s, "ops": dict(s.ops)}
