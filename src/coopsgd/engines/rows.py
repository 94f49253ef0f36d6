"""What the simulator and the distributed engine share: the rows of ``nn.Module`` nodes a process holds.

A process holds rows of one flat tensor ``[float buffers (b) | parameters (d) | momentum (d, only with
momentum > 0)]``: first the workers it runs (all m in the simulator, its own on a distributed rank), then
the auxiliary nodes it keeps. :class:`ModelRows` validates the common arguments, builds the template
module and its :class:`~coopsgd.engines.executors.FlatLayout`, allocates and initialises the rows (the
model's parameters, or ``init_params``: one common start or one per worker, auxiliaries at the workers'
mean), and gives the views. The update of a step is the round kernel's (:mod:`coopsgd.engines.kernel`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.base import NAN_POLICIES, Batch
from coopsgd.engines.executors import FlatLayout, build_model, to_batch
from coopsgd.engines.optim import SGDOptions
from coopsgd.errors import ConfigError, check_int

__all__ = ["ModelRows", "LOSS_ESTIMATES"]

#: How LSGD's per-worker loss estimates are formed.
LOSS_ESTIMATES = ("batch", "running_mean", "probe")


class ModelRows:
    """The common construction of an engine over rows of ``nn.Module`` nodes (see the module docstring).

    Args:
        spec: the algorithm.
        model: an ``nn.Module`` (its current parameters are the common start) or a zero-argument factory
            (called under ``torch.manual_seed(seed)``).
        workers_held: the workers whose rows come first, in order.
        aux_rows: how many auxiliary rows follow.
        loss_fn, momentum, nesterov, weight_decay, dtype, device, seed, loss_estimate, window, nan_policy,
        init_params, probe_batch: as :class:`coopsgd.engines.simulator.Simulator`.
    """

    def __init__(
        self,
        spec: AlgorithmSpec,
        model: nn.Module | Callable[[], nn.Module],
        *,
        workers_held: Sequence[int],
        aux_rows: int,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        dtype: torch.dtype,
        device: str | torch.device,
        seed: int,
        loss_estimate: str,
        window: int,
        nan_policy: str,
        init_params: Tensor | np.ndarray | None,
        probe_batch: Batch | None,
    ) -> None:
        if not isinstance(spec, AlgorithmSpec):
            raise ConfigError.invalid("spec", spec, "must be an AlgorithmSpec (see coopsgd.algorithms.presets)")
        if loss_estimate not in LOSS_ESTIMATES:
            raise ConfigError.invalid("loss_estimate", loss_estimate, f"choose one of {', '.join(LOSS_ESTIMATES)}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError.invalid("dtype", dtype, "must be a floating-point torch.dtype")
        if not callable(loss_fn):
            raise ConfigError.invalid("loss_fn", loss_fn, "must be callable as loss_fn(output, target)")
        if nan_policy not in NAN_POLICIES:
            raise ConfigError.invalid("nan_policy", nan_policy, f"choose one of {', '.join(NAN_POLICIES)}")
        self.spec = spec
        self.m, self.v, self.n = spec.workers, spec.auxiliaries, spec.nodes
        self.nan_policy = nan_policy
        self.loss_fn = loss_fn
        self.opts = SGDOptions(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = check_int("seed", seed)
        self.loss_estimate = loss_estimate
        self.window = check_int("window", window, minimum=1)

        self.template = build_model(model, seed=self.seed, device=self.device).to(device=self.device, dtype=dtype)
        self.template.train()
        self.layout = FlatLayout.from_module(self.template)
        self.d, self.b = self.layout.d, self.layout.b
        if self.d == 0:
            raise ConfigError.invalid("model", type(self.template).__name__, "has no parameters to train")
        held = list(workers_held)
        rows = len(held) + int(aux_rows)
        b, d = self.b, self.d
        self._state = torch.zeros((rows, b + d + (d if self.opts.stateful else 0)), dtype=dtype, device=self.device)
        x0 = self.layout.flat_params(self.template).to(self.device, dtype)
        if init_params is not None:
            given = np.asarray(init_params) if isinstance(init_params, np.ndarray) else init_params
            x0 = torch.as_tensor(given).to(self.device, dtype)
            if x0.shape[-1] != d or x0.ndim not in (1, 2) or (x0.ndim == 2 and x0.shape[0] != self.m):
                raise ConfigError.invalid("init_params", f"tensor of shape {tuple(x0.shape)}",
                                          f"must be ({d},) or ({self.m}, {d})")
        self.per_worker_start = x0.ndim == 2
        with torch.no_grad():
            if self.per_worker_start:  # auxiliaries start at the workers' mean ([CSGD] Theorem 1)
                self._state[: len(held), b : b + d] = x0[held]
                self._state[len(held) :, b : b + d] = x0.mean(dim=0)
            else:
                self._state[:, b : b + d] = x0
            if b:
                self._state[:, :b] = self.layout.flat_buffers(self.template).to(self.device, dtype)
        self.other_buffers: dict[str, Tensor] = {
            name: t.unsqueeze(0).repeat(rows, *([1] * t.dim())).contiguous()
            for name, t in self.layout.other_buffers(self.template).items()
        }
        self._mom_init = torch.zeros(len(held), dtype=torch.bool, device=self.device)
        self._probe: Batch | None = None if probe_batch is None else self._to_batch(probe_batch, "probe_batch")
        if spec.needs_losses and loss_estimate == "probe" and self._probe is None:
            raise ConfigError.invalid("probe_batch", None, "loss_estimate='probe' needs probe_batch=(x, y)")
        # counters every engine keeps
        self.step_count = 0
        self.rounds = 0
        self.leader: int | None = None
        self.schedule_state = spec.schedule.init_state()

    def _check_initial_state(self) -> None:
        # aminmax: one pass and no temporary the size of the state (isfinite() would allocate one)
        lo, hi = torch.aminmax(self._state) if self._state.numel() else (torch.zeros(()), torch.zeros(()))
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ConfigError.invalid("init_params", "non-finite values", "the initial parameters must be finite")

    def _to_batch(self, batch: Any, what: str = "batch") -> Batch:
        return to_batch(batch, what, device=self.device, dtype=self.dtype)

    @property
    def rows_params(self) -> Tensor:
        """(rows, d) parameters of every row held here (a view)."""
        return self._state[:, self.b : self.b + self.d]

    @property
    def rows_buffers(self) -> Tensor:
        """(rows, b) float buffers of every row held here (a view)."""
        return self._state[:, : self.b]

    @property
    def rows_momentum(self) -> Tensor | None:
        """(rows, d) momentum of every row held here (auxiliaries: zero), ``None`` without momentum."""
        return self._state[:, self.b + self.d :] if self.opts.stateful else None
