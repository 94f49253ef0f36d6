"""What the simulator and the distributed engine share: the rows of ``nn.Module`` nodes a process holds.

A process holds rows of one flat tensor ``[float buffers (b) | parameters (d) | optimizer state fields (d
each; SGD: momentum, only with momentum > 0; Adam: exp_avg, exp_avg_sq[, max_exp_avg_sq]) | SCAFFOLD's control
variate (d, only with ``spec.control``)]``: first the workers it runs (all m in the simulator, its own on a distributed rank), then
the auxiliary nodes it keeps. :class:`ModelRows` validates the common arguments, builds the template
module and its :class:`~coopsgd.engines.executors.FlatLayout`, allocates and initialises the rows (the
model's parameters, or ``init_params``: one common start or one per worker, auxiliaries at the workers'
mean), and gives the views. The update of a step is the round kernel's (:mod:`coopsgd.engines.kernel`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.base import NAN_POLICIES, Batch
from coopsgd.engines.executors import FlatLayout, build_model, to_batch
from coopsgd.engines.optim import InnerOptimizer, OuterRuntime, SGDOptions, TorchOptimizer, make_inner
from coopsgd.errors import ConfigError, check_int

__all__ = ["ModelRows", "LOSS_ESTIMATES"]

#: How LSGD's per-worker loss estimates are formed.
LOSS_ESTIMATES = ("batch", "running_mean", "probe")


def _check_arguments(spec: Any, loss_estimate: str, dtype: Any, loss_fn: Any, nan_policy: str) -> None:
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


class ModelRows:
    """The common construction of an engine over rows of ``nn.Module`` nodes (see the module docstring).

    Args:
        spec: the algorithm.
        model: an ``nn.Module`` (its current parameters are the common start) or a zero-argument factory
            (called under ``torch.manual_seed(seed)``).
        workers_held: the workers whose rows come first, in order.
        aux_rows: how many auxiliary rows follow.
        loss_fn, dtype, device, seed, loss_estimate, window, nan_policy, init_params, probe_batch: as
        :class:`coopsgd.engines.simulator.Simulator`.
        optimizer: the workers' inner optimizer (one value: name and settings; ``None``: the algorithm's own,
            else SGD), as :func:`coopsgd.engines.optim.optimizer_settings` makes it from an engine's arguments.
    """

    def __init__(
        self,
        spec: AlgorithmSpec,
        model: nn.Module | Callable[[], nn.Module],
        *,
        workers_held: Sequence[int],
        aux_rows: int,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        dtype: torch.dtype,
        device: str | torch.device,
        seed: int,
        loss_estimate: str,
        window: int,
        nan_policy: str,
        init_params: Tensor | np.ndarray | None,
        probe_batch: Batch | None,
        optimizer: OptimizerSettings | None = None,
    ) -> None:
        _check_arguments(spec, loss_estimate, dtype, loss_fn, nan_policy)
        self.spec = spec
        self.m, self.v, self.n = spec.workers, spec.auxiliaries, spec.nodes
        self.nan_policy = nan_policy
        self.loss_fn = loss_fn
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
        # the workers' inner optimizer: the run's choice, else the one the algorithm prescribes, else SGD
        self.optimizer_settings = (optimizer or OptimizerSettings()).resolve(spec.inner_optimizer)
        self.opts: InnerOptimizer = make_inner(self.optimizer_settings, d=self.d, dtype=dtype, device=self.device,
                                               workers=len(held))
        self.outer = None if spec.outer is None else OuterRuntime(spec.outer, self.d, dtype, self.device)
        self._state = self._initial_rows(held, len(held) + int(aux_rows), init_params)
        self.other_buffers: dict[str, Tensor] = {
            name: t.unsqueeze(0).repeat(self._state.shape[0], *([1] * t.dim())).contiguous()
            for name, t in self.layout.other_buffers(self.template).items()
        }
        self._mom_init = torch.zeros(len(held), dtype=torch.bool, device=self.device)
        # the other optimizers' step counts per worker row (on the CPU: Adam's bias correction reads them)
        self._opt_steps = torch.zeros(len(held), dtype=torch.int64)
        self._probe: Batch | None = None if probe_batch is None else self._to_batch(probe_batch, "probe_batch")
        if spec.needs_losses and loss_estimate == "probe" and self._probe is None:
            raise ConfigError.invalid("probe_batch", None, "loss_estimate='probe' needs probe_batch=(x, y)")
        # counters every engine keeps
        self.step_count = 0
        self.rounds = 0
        self.leader: int | None = None
        self.schedule_state = spec.schedule.init_state()

    def _initial_rows(self, held: list[int], rows: int, init_params: Tensor | np.ndarray | None) -> Tensor:
        """The ``rows`` x ``[b | d | f d]`` state: the template's buffers, its parameters or ``init_params`` (one
        common start, or one per worker: the workers ``held`` take theirs, the auxiliaries the mean), zero
        optimizer state."""
        b, d, dtype = self.b, self.d, self.dtype
        # SCAFFOLD's control variates: one more d-block per node, after the optimizer state (never mixed)
        width = b + d + len(self.opts.fields) * d + (d if self.spec.control else 0)
        state = torch.zeros((rows, width), dtype=dtype, device=self.device)
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
                state[: len(held), b : b + d] = x0[held]
                state[len(held) :, b : b + d] = x0.mean(dim=0)
            else:
                state[:, b : b + d] = x0
            if b:
                state[:, :b] = self.layout.flat_buffers(self.template).to(self.device, dtype)
        return state

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
        """(rows, d) SGD momentum of every row held here (auxiliaries: zero), ``None`` without momentum (and
        for the other optimizers: see :attr:`rows_optimizer_state`)."""
        if isinstance(self.opts, SGDOptions) and self.opts.stateful:
            return self._state[:, self.b + self.d : self.b + 2 * self.d]
        return None

    @property
    def rows_control(self) -> Tensor | None:
        """(rows, d) SCAFFOLD control variates of every row held here (workers: c_i; the server row: c), ``None``
        without them (a view)."""
        if not self.spec.control:
            return None
        return self._state[:, self._state.shape[1] - self.d :]

    @property
    def rows_optimizer_state(self) -> dict[str, Tensor]:
        """Each inner-optimizer state field as a (rows, d) view (auxiliaries: zero), by torch's names."""
        b, d = self.b, self.d
        return {name: self._state[:, b + d + f * d : b + d + (f + 1) * d] for f, name in enumerate(self.opts.fields)}

    @property
    def _opt_counters(self) -> Tensor:
        """The counters the round kernel takes: SGD's momentum flags, or the other optimizers' step counts."""
        return self._mom_init if isinstance(self.opts, SGDOptions) else self._opt_steps

    @property
    def optimizer_steps(self) -> Tensor:
        """(workers held,) step counts of a non-SGD inner optimizer (zeros for SGD)."""
        return self._opt_steps

    def optimizer_info(self) -> dict[str, Any]:
        """The inner and outer optimizers' settings in plain data (for records and run directories)."""
        out: dict[str, Any] = {"inner": self.opts.describe()}  # the arithmetic; the settings: optimizer_settings
        if self.spec.outer is not None:
            out["outer"] = self.spec.outer.describe()
        return out

    def _optimizer_payload(self) -> dict[str, Any]:
        """The non-SGD optimizer state kept outside the state tensor (for checkpoints; none for plain SGD)."""
        out: dict[str, Any] = {}
        if not isinstance(self.opts, SGDOptions):
            out["optimizer_steps"] = self._opt_steps.clone()
        if isinstance(self.opts, TorchOptimizer):
            out["optimizer_extras"] = self.opts.extras_state()
        if self.outer is not None:
            out["outer_state"] = self.outer.state_dict()
        return out

    def _load_optimizer_payload(self, state: dict[str, Any], prefix: str) -> None:
        """Restore :meth:`_optimizer_payload` (after the state tensor itself was restored)."""
        for key in self._optimizer_payload():
            if key not in state:
                raise ConfigError.invalid(f"{prefix}.{key}", None, "missing: the checkpoint was written with another "
                                          "optimizer (or outer optimizer)")
        if not isinstance(self.opts, SGDOptions):
            steps = state["optimizer_steps"]
            if tuple(steps.shape) != tuple(self._opt_steps.shape):
                raise ConfigError.invalid(f"{prefix}.optimizer_steps", tuple(steps.shape),
                                          f"expected {tuple(self._opt_steps.shape)}")
            self._opt_steps.copy_(steps)
        if isinstance(self.opts, TorchOptimizer):
            w = self._opt_steps.shape[0]
            fields = [t[:w] for t in self.rows_optimizer_state.values()]
            self.opts.load_extras(state["optimizer_extras"], fields)
        if self.outer is not None:
            self.outer.load_state_dict(state["outer_state"])

    def _optimizer_snapshot(self) -> dict[str, Any]:
        """The optimizer state outside the state tensor, for a rollback (``nan_policy="skip"``, checked steps)."""
        snap: dict[str, Any] = {"steps": self._opt_steps.clone()}
        if isinstance(self.opts, TorchOptimizer):
            snap["extras"] = self.opts.extras_state()
        if self.outer is not None:
            snap["outer"] = self.outer.snapshot()
        return snap

    def _optimizer_restore(self, snap: dict[str, Any]) -> None:
        self._opt_steps.copy_(snap["steps"])
        if isinstance(self.opts, TorchOptimizer):
            w = self._opt_steps.shape[0]
            self.opts.load_extras(snap["extras"], [t[:w] for t in self.rows_optimizer_state.values()])
        if self.outer is not None:
            self.outer.restore(snap["outer"])

    def async_record(self) -> dict[str, Any]:
        """An asynchronous server's staleness statistics for the metric records (the simulator's own); empty here."""
        return {}

    # -- what both engines' checkpoints and rollbacks hold of the rows -----------------------------------------
    def _rows_payload(self) -> dict[str, Any]:
        """The rows, the counters and the optimizers' state for a checkpoint (CPU copies; each engine adds
        its own entries). ``optimizer_settings`` records the inner optimizer the state was made with
        (:meth:`_check_optimizer_settings`; absent from checkpoints written before it was recorded)."""
        return {
            "state": self._state.detach().to("cpu", copy=True),
            "other_buffers": {k: t.detach().to("cpu", copy=True) for k, t in self.other_buffers.items()},
            "momentum_initialized": self._mom_init.to("cpu", copy=True),
            "step": self.step_count,
            "rounds": self.rounds,
            "leader": self.leader,
            "schedule_state": json.dumps(self.schedule_state),
            "optimizer_settings": self.optimizer_settings.to_dict(),
            **self._optimizer_payload(),
        }

    def _load_rows_payload(self, state: dict[str, Any], prefix: str) -> None:
        """Restore :meth:`_rows_payload` (its shapes checked by the engine; the settings by
        :meth:`_check_optimizer_settings`, before anything else)."""
        with torch.no_grad():
            self._state.copy_(state["state"])
            for k, t in state["other_buffers"].items():
                self.other_buffers[k].copy_(t)
            self._mom_init.copy_(state["momentum_initialized"])
            self._load_optimizer_payload(state, prefix)
        self.step_count = int(state["step"])
        self.rounds = int(state["rounds"])
        self.leader = None if state["leader"] is None else int(state["leader"])
        self.schedule_state = json.loads(state["schedule_state"])

    def _check_optimizer_settings(self, state: dict[str, Any], prefix: str) -> None:
        """A checkpoint resumes only under the inner optimizer it was written with: a recorded setting that
        differs from this engine's (and changes its arithmetic) is a :class:`~coopsgd.errors.ConfigError`
        naming it. Checkpoints without the record (written before it was kept) are not checked."""
        saved = state.get("optimizer_settings")
        if saved is None:
            return
        mine = self.optimizer_settings.to_dict()
        for key in dict.fromkeys([*mine, *saved]):
            if key not in saved or key not in mine or saved[key] != mine[key]:
                if self._same_arithmetic(key, saved.get(key)):
                    continue  # e.g. weight_decay None (torch's default) and its value, or an unused Adam beta under SGD
                raise ConfigError.invalid(
                    f"{prefix}.optimizer_settings.{key}", saved.get(key),
                    f"the checkpoint was written with the inner optimizer {_describe(saved)}, this run uses "
                    f"{_describe(mine)} ({key}={mine.get(key)!r}); resume with the checkpoint's optimizer settings")

    def _same_arithmetic(self, key: str, value: Any) -> bool:
        """Whether this engine's optimizer with setting ``key`` changed to ``value`` computes the same updates."""
        if key in ("name", "torch_class", "torch_kwargs") or isinstance(self.opts, TorchOptimizer):
            return False
        try:
            other = make_inner(replace(self.optimizer_settings, **{key: value}), d=0, dtype=self.dtype)
        except (ConfigError, TypeError, ValueError):
            return False
        return bool(other.describe() == self.opts.describe())

    def _snapshot_rows(self, into: dict[str, Any] | None = None) -> dict[str, Any]:
        """The rows' state for a rollback (``nan_policy="skip"``): the state tensor (copied into ``into``'s
        when it fits: no new full-state allocation per round), integer buffers, momentum flags and the
        optimizer state kept outside the tensor."""
        if into is not None and into["state"].shape == self._state.shape:
            into["state"].copy_(self._state)
            snap = into
        else:
            snap = {"state": self._state.clone()}
        snap.update({"other": {k: t.clone() for k, t in self.other_buffers.items()},
                     "mom_init": self._mom_init.clone(), "optimizer": self._optimizer_snapshot()})
        return snap

    def _restore_rows(self, snap: dict[str, Any]) -> None:
        """Restore a :meth:`_snapshot_rows`."""
        with torch.no_grad():
            self._state.copy_(snap["state"])
            for k, t in snap["other"].items():
                self.other_buffers[k].copy_(t)
            self._mom_init.copy_(snap["mom_init"])
            self._optimizer_restore(snap["optimizer"])


def _describe(settings: dict[str, Any]) -> str:
    return str(settings.get("torch_class") or settings.get("name"))
