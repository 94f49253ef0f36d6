"""Inner optimizers on stacked worker rows, and the outer optimizer of an auxiliary node.

Every worker runs its own optimizer. The rows a process holds are stacked (one row per worker), and an
optimizer's state is stacked the same way: one ``(rows, d)`` block of columns per state *field* (SGD's
``momentum_buffer``; Adam's ``exp_avg``, ``exp_avg_sq`` and, with AMSGrad, ``max_exp_avg_sq``) placed
after the parameters in the process's state tensor, plus one *counter* per worker row (SGD: whether the
momentum buffer exists yet; Adam: the step count of the bias correction). All arithmetic is on the
stacked rows at once, never a Python loop over workers -- except for :class:`TorchOptimizer`, the
fallback for any other ``torch.optim.Optimizer`` class.

Inner optimizers (:func:`make_inner`):

* :class:`SGDOptions` -- ``torch.optim.SGD`` (momentum, Nesterov, weight decay, dampening 0). For one
  worker with gradient g, parameters x and momentum buffer buf::

      g' = g + wd * x
      buf = g'                       at the worker's first step
      buf = mu * buf + g'            afterwards
      D = g' + mu * buf  (nesterov)  or  buf  (momentum)  or  g'  (mu = 0)

  and the update direction D replaces the gradient in the framework's update rule ([CSGD] eq. (10)).
* :class:`AdamOptions` -- ``torch.optim.Adam`` / ``torch.optim.AdamW`` (same defaults: betas (0.9, 0.999),
  eps 1e-8, weight decay 0 for Adam and 0.01 for AdamW, optional AMSGrad), the operations of torch's
  single-tensor implementation in the same order, with one step count per worker row for the bias
  correction.
* :class:`TorchOptimizer` -- any other ``torch.optim.Optimizer`` class: one instance per worker over a
  parameter of its own; the state fields shaped like the parameters live in the stacked columns and are
  copied into the instance before its step and back after it. Correct, but each step costs one Python
  call per active worker plus two copies of the state fields: use it for optimizers the built-in ones do
  not cover.

The outer optimizer (:class:`OuterRuntime`) is the auxiliary node's own optimizer (DiLoCo, SlowMo; see
:mod:`coopsgd.algorithms.outer`): after an outer round, z takes the pseudo-gradient
``Delta = z - mean(workers)`` as its gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.algorithms.outer import ADAPTIVE_KINDS, OuterOptimizer
from coopsgd.errors import ConfigError, check_float

__all__ = [
    "OPTIMIZERS",
    "SGDOptions",
    "AdamOptions",
    "TorchOptimizer",
    "InnerOptimizer",
    "make_inner",
    "optimizer_settings",
    "OPTIMIZER_OPTIONS",
    "sgd_direction_",
    "OuterRuntime",
]

#: The inner optimizers known by name (any ``torch.optim.Optimizer`` class is accepted too).
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class SGDOptions:
    """Optimizer settings shared by all workers (``momentum`` mu, ``nesterov``, ``weight_decay`` wd)."""

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", check_float("momentum", self.momentum, low=0.0))
        object.__setattr__(self, "weight_decay", check_float("weight_decay", self.weight_decay, low=0.0))
        if not isinstance(self.nesterov, bool):
            raise ConfigError.invalid("nesterov", self.nesterov, "must be True or False")
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError.invalid("nesterov", True, "Nesterov momentum needs momentum > 0")

    name = "sgd"

    @property
    def stateful(self) -> bool:
        """True when each worker keeps a momentum buffer."""
        return self.momentum > 0.0

    @property
    def fields(self) -> tuple[str, ...]:
        """The per-worker state fields, each ``(rows, d)``, in column order."""
        return ("momentum_buffer",) if self.stateful else ()

    def describe(self) -> dict[str, Any]:
        return {"name": "sgd", "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}


def sgd_direction_(
    grads: Tensor, params: Tensor | None, buf: Tensor | None, initialized: Tensor | None, opts: SGDOptions
) -> Tensor:
    """Return the update direction D for stacked rows; modifies ``grads`` (scratch) and ``buf`` in place.

    Args:
        grads: (k, d) stochastic gradients; overwritten (it becomes g' and, with Nesterov, D).
        params: (k, d) current parameters (read for weight decay; may be ``None`` without it).
        buf: (k, d) momentum rows (updated in place), or ``None`` when ``opts.momentum == 0``.
        initialized: (k,) bool, whether each row already has a momentum buffer (torch creates it at the
            first step as a copy of g').
        opts: the optimizer settings.
    """
    g = grads
    if opts.weight_decay != 0.0:
        assert params is not None
        g.add_(params, alpha=opts.weight_decay)
    if not opts.stateful:
        return g
    assert buf is not None and initialized is not None
    mu = opts.momentum
    if bool(initialized.all()):
        buf.mul_(mu).add_(g)
    else:
        new = torch.where(initialized[:, None], buf * mu + g, g)
        buf.copy_(new)
    if opts.nesterov:
        return g.add_(buf, alpha=mu)
    return buf


def _bias(beta: float, steps: np.ndarray) -> np.ndarray:
    """``1 - beta**t`` per row, as Python's float power computes it (torch uses Python floats here)."""
    return np.array([1.0 - beta ** float(t) for t in steps], dtype=np.float64)


@dataclass(frozen=True)
class AdamOptions:
    """``torch.optim.Adam`` (``decoupled=False``) or ``torch.optim.AdamW`` (``decoupled=True``) settings.

    ``weight_decay`` is L2 regularisation added to the gradient for Adam and the decoupled decay
    ``x <- x (1 - lr wd)`` for AdamW, as in torch.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    decoupled: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ConfigError.invalid("betas", self.betas, "must be two numbers (beta1, beta2)")
        b1 = check_float("beta1", self.betas[0], low=0.0, high=1.0, high_open=True)
        b2 = check_float("beta2", self.betas[1], low=0.0, high=1.0, high_open=True)
        object.__setattr__(self, "betas", (b1, b2))
        object.__setattr__(self, "eps", check_float("eps", self.eps, low=0.0, low_open=True))
        object.__setattr__(self, "weight_decay", check_float("weight_decay", self.weight_decay, low=0.0))
        for name in ("amsgrad", "decoupled"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError.invalid(name, getattr(self, name), "must be True or False")

    @property
    def name(self) -> str:
        return "adamw" if self.decoupled else "adam"

    stateful = True

    @property
    def fields(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "amsgrad": self.amsgrad}

    def step_(self, X: Tensor, grads: Tensor, fields: Sequence[Tensor], steps: np.ndarray, lr: float,
              *, apply: bool) -> Tensor | None:
        """One Adam step of the rows ``X`` (k, d) whose step counts (already incremented) are ``steps``.

        ``grads`` is scratch; ``fields`` (each (k, d)) are updated in place. ``apply``: update ``X`` in place
        (torch's own operations) and return ``None``; else leave ``X`` alone and return the increment
        ``x_new - x`` (the pre-mix rule adds it after the round).
        """
        b1, b2 = self.betas
        wd = self.weight_decay
        g = grads
        if wd != 0.0 and not self.decoupled:
            g.add_(X, alpha=wd)
        m, v = fields[0], fields[1]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        src = v
        if self.amsgrad:
            torch.maximum(fields[2], v, out=fields[2])
            src = fields[2]
        same = bool(np.all(steps == steps[0]))
        denom = torch.sqrt(src, out=g)  # g is no longer needed: reuse its memory
        if same:
            t = float(steps[0])
            bc1 = 1 - b1**t
            step_size: float | Tensor = lr / bc1
            denom.div_((1 - b2**t) ** 0.5).add_(self.eps)
        else:
            bc1v = _bias(b1, steps)
            bc2s = torch.as_tensor(_bias(b2, steps) ** 0.5, dtype=X.dtype, device=X.device)[:, None]
            step_size = torch.as_tensor(lr / bc1v, dtype=X.dtype, device=X.device)[:, None]
            denom.div_(bc2s).add_(self.eps)
        if apply:
            if wd != 0.0 and self.decoupled:
                X.mul_(1 - lr * wd)
            if isinstance(step_size, float):
                X.addcdiv_(m, denom, value=-step_size)
            else:
                X.sub_(m / denom * step_size)
            return None
        U = m / denom
        if isinstance(step_size, float):
            U.mul_(-step_size)
        else:
            U.mul_(step_size).neg_()
        if wd != 0.0 and self.decoupled:
            U.add_(X, alpha=-lr * wd)
        return U


class TorchOptimizer:
    """Any ``torch.optim.Optimizer`` class, one instance per worker row (see the module docstring).

    The state entries shaped like the parameters (floating, ``(d,)``) are the stacked *fields* (mixed or
    reset by the policies, checkpointed in the state tensor); every other entry (step counters, scalars)
    stays in the worker's instance and is checkpointed through :meth:`extras_state`. The instance of a
    worker whose counter is 0 (never stepped, or reset) starts with an empty state, so the optimizer
    initialises it lazily as it would on its own.

    Args:
        cls: the optimizer class.
        kwargs: its keyword arguments (``lr`` is set to each step's learning rate).
        d: the number of parameters per worker; dtype, device: of the rows; workers: rows held here.
    """

    stateful = True

    def __init__(self, cls: type, kwargs: Mapping[str, Any] | None, d: int, dtype: torch.dtype,
                 device: torch.device, workers: int) -> None:
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError.invalid("optimizer", cls, f"choose one of {', '.join(OPTIMIZERS)} or pass a "
                                      "torch.optim.Optimizer class")
        self.cls = cls
        self.kwargs = dict(kwargs or {})
        if "lr" in self.kwargs:
            raise ConfigError.invalid("optimizer_kwargs.lr", self.kwargs["lr"], "the run's learning rate is used: "
                                      "leave lr out")
        self.d, self.dtype, self.device = d, dtype, device
        self.name = cls.__name__
        probe = torch.nn.Parameter(torch.zeros(d, dtype=dtype, device=device))
        ctor: Any = cls
        try:
            opt = ctor([probe], lr=0.0, **self.kwargs)
            probe.grad = torch.ones_like(probe)
            opt.step()
        except Exception as exc:
            raise ConfigError.invalid("optimizer", cls.__name__, f"cannot be stepped with a gradient alone "
                                      f"({type(exc).__name__}: {exc})") from None
        self._fields = tuple(k for k, t in opt.state[probe].items()
                             if isinstance(t, Tensor) and t.shape == (d,) and t.is_floating_point())
        self._params = [torch.nn.Parameter(torch.zeros(d, dtype=dtype, device=device)) for _ in range(workers)]
        self._opts = [ctor([p], lr=0.0, **self.kwargs) for p in self._params]

    @property
    def fields(self) -> tuple[str, ...]:
        return self._fields

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "torch_class": f"{self.cls.__module__}.{self.cls.__qualname__}",
                "kwargs": {k: v for k, v in self.kwargs.items() if isinstance(v, (int, float, str, bool))}}

    def step_(self, X: Tensor, grads: Tensor, fields: Sequence[Tensor], workers: Sequence[int],
              counts: Tensor, lr: float, *, apply: bool) -> Tensor | None:
        """Step worker ``workers[j]``'s instance on row ``j`` of ``X`` (see :meth:`AdamOptions.step_`)."""
        U = None if apply else torch.empty_like(X)
        for j, i in enumerate(workers):
            p, opt = self._params[i], self._opts[i]
            st = opt.state[p]
            if int(counts[j]) == 0:
                st.clear()
            else:
                for f, name in enumerate(self._fields):
                    if name in st:
                        st[name].copy_(fields[f][j])
            with torch.no_grad():
                p.copy_(X[j])
            p.grad = grads[j]
            opt.param_groups[0]["lr"] = lr
            opt.step()
            p.grad = None
            st = opt.state[p]
            for f, name in enumerate(self._fields):
                if name in st:
                    fields[f][j].copy_(st[name])
            if U is None:
                X[j].copy_(p.detach())
            else:
                torch.sub(p.detach(), X[j], out=U[j])
        return U

    def reset(self) -> None:
        """Forget every instance's state (the policies' ``"reset"``; the next step starts afresh)."""
        for p, opt in zip(self._params, self._opts, strict=True):
            opt.state[p].clear()

    def extras_state(self) -> list[dict[str, Any]]:
        """Per worker, the state entries that are not fields (cloned; for checkpoints)."""
        out = []
        for p, opt in zip(self._params, self._opts, strict=True):
            out.append({k: (v.detach().clone() if isinstance(v, Tensor) else v)
                        for k, v in opt.state[p].items() if k not in self._fields})
        return out

    def load_extras(self, extras: Sequence[Mapping[str, Any]], fields: Sequence[Tensor]) -> None:
        """Restore :meth:`extras_state`; the fields are taken from the rows (``fields``: each (workers, d))."""
        if len(extras) != len(self._opts):
            raise ConfigError.invalid("optimizer_extras", len(extras), f"expected {len(self._opts)} workers")
        for i, (p, opt) in enumerate(zip(self._params, self._opts, strict=True)):
            st = opt.state[p]
            st.clear()
            if not extras[i]:
                continue
            for k, v in extras[i].items():
                st[k] = v.clone().to(self.device) if isinstance(v, Tensor) and v.dim() else (
                    v.clone() if isinstance(v, Tensor) else v)
            for f, name in enumerate(self._fields):
                st[name] = fields[f][i].detach().clone()


#: An inner optimizer: the options of a built-in one, or the per-worker instances of a torch class.
InnerOptimizer = SGDOptions | AdamOptions | TorchOptimizer


#: the inner optimizer's settings the engines also accept one by one (Python API convenience)
OPTIMIZER_OPTIONS = ("momentum", "nesterov", "weight_decay", "betas", "eps", "amsgrad", "optimizer_kwargs")


def optimizer_settings(optimizer: OptimizerSettings | str | type | None = None, **options: Any) -> OptimizerSettings:
    """The one :class:`~coopsgd.algorithms.inner.OptimizerSettings` of an engine's ``optimizer`` argument.

    ``optimizer``: settings (as they are), a name (``"sgd"``, ``"adam"``, ``"adamw"``), a
    ``torch.optim.Optimizer`` class, or ``None`` (the algorithm's own, else SGD: see
    :meth:`~coopsgd.algorithms.inner.OptimizerSettings.resolve`). ``options``: settings given one by one
    (:data:`OPTIMIZER_OPTIONS`: ``betas=(beta1, beta2)``; a torch class's arguments as ``optimizer_kwargs``).
    """
    unknown = sorted(set(options) - set(OPTIMIZER_OPTIONS))
    if unknown:
        raise TypeError(f"unknown optimizer option {unknown[0]!r}; choose from {', '.join(OPTIMIZER_OPTIONS)}")
    if isinstance(optimizer, OptimizerSettings):
        if options:
            name = sorted(options)[0]
            raise ConfigError.invalid(name, options[name], "give it inside the OptimizerSettings")
        return optimizer
    fields = {k: v for k, v in options.items() if k not in ("betas", "optimizer_kwargs")}
    if "betas" in options:
        fields["beta1"], fields["beta2"] = (float(b) for b in options["betas"])
    kwargs = options.get("optimizer_kwargs")
    if optimizer is None or isinstance(optimizer, str):
        if kwargs:
            raise ConfigError.invalid("optimizer_kwargs", dict(kwargs), "only for a torch.optim.Optimizer class")
        return OptimizerSettings(name=optimizer, **fields)
    if not isinstance(optimizer, type):
        raise ConfigError.invalid("optimizer", optimizer, f"choose one of {', '.join(OPTIMIZERS)} or pass a "
                                  "torch.optim.Optimizer class")
    if any(fields.get(k) not in (None, 0.0, False) for k in ("momentum", "nesterov", "weight_decay", "amsgrad")):
        raise ConfigError.invalid("optimizer", optimizer.__name__,
                                  "give a torch optimizer's own settings in optimizer_kwargs")
    return OptimizerSettings(torch_class=optimizer, torch_kwargs=kwargs)


def make_inner(
    optimizer: OptimizerSettings | str | type | SGDOptions | AdamOptions | None,
    *,
    d: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    workers: int = 1,
    prescribed: str | None = None,
    **options: Any,
) -> InnerOptimizer:
    """The inner optimizer's arithmetic from its settings (:func:`optimizer_settings` of ``optimizer`` and
    ``options``; a name left open is the algorithm's ``prescribed`` one, else SGD), or options as they are.

    ``weight_decay=None`` is the optimizer's own default (torch's): 0 for SGD and Adam, 0.01 for AdamW.
    A torch class takes its arguments from ``torch_kwargs`` (``optimizer_kwargs``).
    """
    if isinstance(optimizer, (SGDOptions, AdamOptions)):
        return optimizer
    st = optimizer_settings(optimizer, **options).resolve(prescribed)
    if st.torch_class is not None:
        return TorchOptimizer(st.torch_class, st.torch_kwargs, d, dtype, torch.device(device), workers)
    if st.name == "sgd":
        return SGDOptions(momentum=st.momentum, nesterov=st.nesterov, weight_decay=st.effective_weight_decay())
    return AdamOptions(betas=st.betas, eps=st.eps, weight_decay=st.effective_weight_decay(), amsgrad=st.amsgrad,
                       decoupled=st.name == "adamw")


# ---------------------------------------------------------------------------------------------------------
# the outer optimizer (the auxiliary node's own)
# ---------------------------------------------------------------------------------------------------------


class OuterRuntime:
    """The state and the step of an auxiliary node's outer optimizer (:class:`OuterOptimizer`).

    One outer step with the workers' average ``a``, the auxiliary ``z`` and the learning rate ``lr`` of
    the step ending the round (all the same on every process holding z)::

        Delta = z - a                              (the pseudo-gradient)
        sgd:  buf = mu * r * buf + Delta            (r = lr / last lr with lr_scaled, else 1; buf starts at 0)
              D = Delta + mu * buf (nesterov)  or  buf  (mu > 0)  or  Delta
        adam: torch.optim.Adam's direction of Delta (step count, bias correction)
        adam without bias correction, yogi, adagrad (Reddi et al., ICLR 2021, Algorithm 2):
              m = beta1 m + (1 - beta1) Delta
              v = beta2 v + (1 - beta2) Delta^2  |  v - (1 - beta2) Delta^2 sign(v - Delta^2)  |  v + Delta^2
              D = m / (sqrt(v) + eps)
        z <- a + (Delta - outer_lr * D)

    ``a + (Delta - outer_lr * D)`` is ``z - outer_lr * D`` written so that outer lr 1 without momentum gives
    exactly ``a`` (plain averaging). With ``lr_scaled`` (SlowMo) the buffer is SlowMo's slow momentum u
    times the inner learning rate, so that a learning-rate change between rounds rescales it as SlowMo's
    ``u = beta u + Delta / lr`` does.
    """

    def __init__(self, spec: OuterOptimizer, d: int, dtype: torch.dtype, device: torch.device) -> None:
        self.spec = spec
        self.d, self.dtype, self.device = d, dtype, device
        self.state: dict[str, Any] = self._fresh()

    def _fresh(self) -> dict[str, Any]:
        z = lambda: torch.zeros(self.d, dtype=self.dtype, device=self.device)  # noqa: E731
        if self.spec.kind in ADAPTIVE_KINDS:
            return {"step": 0, "exp_avg": z(), "exp_avg_sq": z()}
        out: dict[str, Any] = {"step": 0, "last_lr": 0.0}
        if self.spec.momentum > 0:
            out["momentum_buffer"] = z()
        return out

    def step(self, z: Tensor, a: Tensor, lr: float, cols: tuple[int, int] | None = None) -> Tensor:
        """The new z (a new tensor); updates this optimizer's state.

        ``cols``: z and a are the coordinates ``[lo, hi)`` only (a Streaming DiLoCo fragment): the step reads
        and updates the state of those coordinates alone (the step count counts every call). Only the SGD
        kinds take ``cols`` (the adaptive kinds' bias correction counts whole-model rounds).
        """
        if cols is not None:
            return self._fragment_step(z, a, lr, cols)
        o, st = self.spec, self.state
        delta = z - a
        st["step"] = int(st["step"]) + 1
        if o.kind == "adam" and o.bias_correction:
            b1, b2 = o.betas
            t = float(st["step"])
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.lerp_(delta, 1 - b1)
            v.mul_(b2).addcmul_(delta, delta, value=1 - b2)
            denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(o.eps)
            D = m / denom
            D.mul_(1.0 / (1 - b1**t))
        elif o.kind in ADAPTIVE_KINDS:  # Reddi et al.'s server rules: no bias correction, eps outside the root
            b1, b2 = o.betas
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.lerp_(delta, 1 - b1)
            sq = delta * delta
            if o.kind == "adam":
                v.mul_(b2).add_(sq, alpha=1 - b2)
            elif o.kind == "yogi":
                v.sub_(sq * torch.sign(v - sq), alpha=1 - b2)
            else:
                v.add_(sq)
            D = m / v.sqrt().add_(o.eps)
        elif o.momentum > 0:
            buf = st["momentum_buffer"]
            last = float(st["last_lr"])
            r = lr / last if (o.lr_scaled and last > 0.0) else 1.0
            buf.mul_(o.momentum * r).add_(delta)
            D = delta + o.momentum * buf if o.nesterov else buf
        else:
            D = delta
        if o.lr_scaled:
            o.check_round_lr(lr)
            st["last_lr"] = float(lr)
        return a + (delta - o.lr * D)

    def _fragment_step(self, z: Tensor, a: Tensor, lr: float, cols: tuple[int, int]) -> Tensor:
        """:meth:`step` on the coordinates ``cols`` (SGD with or without (Nesterov) momentum), same operations."""
        o, st = self.spec, self.state
        if o.kind != "sgd" or o.lr_scaled:
            raise ConfigError.invalid("outer_optimizer", o.kind, "a fragment's outer step needs plain SGD outer "
                                      "steps (momentum, Nesterov; no lr scaling)")
        delta = z - a
        st["step"] = int(st["step"]) + 1
        if o.momentum > 0:
            buf = st["momentum_buffer"][cols[0] : cols[1]]
            buf.mul_(o.momentum).add_(delta)
            D = delta + o.momentum * buf if o.nesterov else buf
        else:
            D = delta
        return a + (delta - o.lr * D)

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v) for k, v in self.state.items()}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        fresh = self._fresh()
        if set(saved) != set(fresh):
            raise ConfigError.invalid("outer_state", sorted(saved), f"this outer optimizer keeps {sorted(fresh)}")
        for k, v in saved.items():
            if isinstance(fresh[k], Tensor):
                if tuple(v.shape) != (self.d,):
                    raise ConfigError.invalid(f"outer_state.{k}", tuple(v.shape), f"expected ({self.d},)")
                fresh[k].copy_(v)
            else:
                fresh[k] = type(fresh[k])(v)
        self.state = fresh

    def snapshot(self) -> dict[str, Any]:
        return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self.state.items()}

    def restore(self, snap: Mapping[str, Any]) -> None:
        self.state = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in snap.items()}
