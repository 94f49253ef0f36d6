"""An outer optimizer on an auxiliary node: DiLoCo and SlowMo as members of the framework.

The workers run a base algorithm (local steps, gossip or fully synchronous SGD). Every ``period`` steps an
*outer round* averages the workers exactly; the auxiliary node z (node m, the model to evaluate) then takes
the pseudo-gradient ``Delta = z - mean(workers)`` and applies its own optimizer to it, and every worker
restarts from the new z:

* DiLoCo (Douillard et al., 2023): inner AdamW, outer SGD with Nesterov momentum (lr 0.7, momentum 0.9);
* SlowMo (Wang, Tantia, Ballas, Rabbat, ICLR 2020): any base algorithm, outer heavy-ball "slow momentum"
  beta with slow learning rate alpha; its momentum is ``u = beta u + Delta / lr`` and the step
  ``z <- z - alpha lr u`` (``lr`` the base optimizer's learning rate), i.e. :class:`OuterOptimizer` with
  ``lr_scaled=True``.

* the server optimizers of federated learning (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
  Algorithms 1 and 2): FedAvgM is ``"sgd"`` with momentum; FedAdam, FedYogi and FedAdagrad are ``"adam"``
  (without bias correction), ``"yogi"`` and ``"adagrad"``. With Reddi's pseudo-gradient
  ``Delta_t = mean(y_i) - x = -Delta`` (the sign is the only difference; v only sees squares)::

      m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
      v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2                     (FedAdam)
      v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)  (FedYogi)
      v_t = v_{t-1} + Delta_t^2                                       (FedAdagrad)
      x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

  with m and v starting at 0 (Flower's choice; the paper's analysis assumes v_{-1} >= tau^2), eta the
  ``lr`` and the adaptivity tau the ``eps``. There the round is FedAvg's (the sampled clients' weighted
  average sent to every node, z included), so the engines keep z's value from before the round.

Outer lr 1 without momentum is plain averaging: the base algorithm with an exact average every ``period``
steps (local SGD itself when the base does not communicate between outer rounds).

:class:`OuterSchedule` writes the rounds as mixing matrices over ``m + 1`` nodes: the base algorithm's
matrices with z left alone, and at an outer round ``blockdiag(J_m, 1)`` (the workers averaged, z
untouched) tagged ``info["outer"] = True``; the engines then apply the outer step (see
:class:`coopsgd.engines.optim.OuterRuntime`). The step itself is not linear, so no fixed W describes it
and the [CSGD] theorems do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coopsgd.algorithms.schedules import Mix, MixContext, Schedule, ScheduleState
from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["OuterOptimizer", "OuterSchedule", "OUTER_KINDS", "ADAPTIVE_KINDS", "outer_matrix"]

#: Outer optimizers: torch.optim.SGD semantics (momentum, Nesterov), torch.optim.Adam semantics (or, without bias
#: correction, Reddi et al.'s FedAdam), and Reddi et al.'s Yogi and Adagrad server rules.
OUTER_KINDS = ("sgd", "adam", "yogi", "adagrad")
#: The kinds that keep the moments m (``exp_avg``) and v (``exp_avg_sq``).
ADAPTIVE_KINDS = ("adam", "yogi", "adagrad")


@dataclass(frozen=True)
class OuterOptimizer:
    """The auxiliary node's optimizer.

    Attributes:
        kind: ``"sgd"`` (momentum / Nesterov as ``torch.optim.SGD``, dampening 0), ``"adam"``, ``"yogi"`` or
            ``"adagrad"`` (see the module docstring).
        lr: outer learning rate (DiLoCo 0.7; SlowMo's slow learning rate alpha; the server learning rate eta).
        momentum: outer momentum (DiLoCo 0.9; SlowMo's slow momentum beta; FedAvgM's beta); SGD only.
        nesterov: Nesterov momentum (DiLoCo); SGD only.
        betas, eps: Adam's (``eps``: Reddi et al.'s adaptivity tau); Adagrad reads only beta1.
        bias_correction: ``"adam"`` only: torch.optim.Adam's bias correction (True, DiLoCo's outer Adam) or
            Reddi et al.'s FedAdam without it (False); Yogi and Adagrad have none.
        lr_scaled: SlowMo's scaling: the momentum is kept in units of the pseudo-gradient divided by the
            inner learning rate of the round's last step (a learning-rate change between rounds rescales it).
    """

    kind: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_scaled: bool = False
    bias_correction: bool = True

    def __post_init__(self) -> None:
        if self.kind not in OUTER_KINDS:
            raise ConfigError.invalid("outer_optimizer", self.kind, f"choose one of {', '.join(OUTER_KINDS)}")
        object.__setattr__(self, "lr", check_float("outer_lr", self.lr, low=0.0, low_open=True))
        object.__setattr__(self, "momentum", check_float("outer_momentum", self.momentum, low=0.0, high=1.0,
                                                         high_open=True))
        if not isinstance(self.nesterov, bool):
            raise ConfigError.invalid("outer_nesterov", self.nesterov, "must be True or False")
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError.invalid("outer_momentum", self.momentum, "Nesterov outer momentum needs momentum > 0")
        if self.kind in ADAPTIVE_KINDS and (self.momentum != 0.0 or self.lr_scaled or self.nesterov):
            raise ConfigError.invalid("outer_momentum", self.momentum, f"the {self.kind} outer optimizer uses betas "
                                      "(no momentum, no lr scaling)")
        if not isinstance(self.bias_correction, bool):
            raise ConfigError.invalid("outer_bias_correction", self.bias_correction, "must be True or False")
        if self.kind in ("yogi", "adagrad") and self.bias_correction:
            object.__setattr__(self, "bias_correction", False)  # the rules have none (Reddi et al., Algorithm 2)
        b = tuple(self.betas)
        if len(b) != 2:
            raise ConfigError.invalid("outer_betas", self.betas, "must be two numbers")
        object.__setattr__(self, "betas", (check_float("outer_beta1", b[0], low=0.0, high=1.0, high_open=True),
                                           check_float("outer_beta2", b[1], low=0.0, high=1.0, high_open=True)))
        object.__setattr__(self, "eps", check_float("outer_eps", self.eps, low=0.0, low_open=True))

    @property
    def averaging(self) -> bool:
        """True when the outer step is plain averaging (SGD, lr 1, no momentum)."""
        return self.kind == "sgd" and self.lr == 1.0 and self.momentum == 0.0

    def check_round_lr(self, lr: float) -> None:
        """An lr-scaled outer step (SlowMo) divides by the learning rate at the end of a round: it must be > 0."""
        if self.lr_scaled and not lr > 0.0:
            raise ConfigError.invalid("lr", lr, "the outer step of an lr-scaled outer optimizer (SlowMo) needs "
                                      "lr > 0 at the end of every round")

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "lr": self.lr}
        if self.kind == "sgd":
            out.update(momentum=self.momentum, nesterov=self.nesterov, lr_scaled=self.lr_scaled)
        else:
            out.update(betas=list(self.betas), eps=self.eps)
            if not self.bias_correction:
                out["bias_correction"] = False
        return out


def outer_matrix(workers: int) -> np.ndarray:
    """``blockdiag(J_m, 1)`` over m workers and z (column convention): the workers averaged, z untouched."""
    m = check_int("workers", workers, minimum=1)
    S = np.zeros((m + 1, m + 1))
    S[:m, :m] = 1.0 / m
    S[m, m] = 1.0
    return S


class OuterSchedule:
    """The rounds of a base schedule over m workers plus an outer round every ``period`` steps.

    Node layout: the m workers, then z (node m). Between outer rounds the base schedule's mixes apply with
    z left alone (``base=None``: no communication, local steps); after step ``k`` with
    ``(k + 1) % period == 0`` the outer round's :func:`outer_matrix` applies instead (it averages the
    workers exactly, which is what the base would have done on a round that coincides with it), tagged
    ``info["outer"] = True``. Pure, like every schedule: the base's run state is advanced by
    :meth:`advance` and returned.
    """

    needs_losses = False
    sequential = False

    def __init__(self, workers: int, period: int, base: Schedule | None = None) -> None:
        self.m = check_int("workers", workers, minimum=1)
        self.period = check_int("tau", period, minimum=1)
        if base is not None:
            if getattr(base, "n", None) != self.m:
                raise ConfigError.invalid("base", f"{getattr(base, 'n', None)} nodes",
                                          f"the base schedule must act on the {self.m} workers only")
            if base.needs_losses or base.sequential:
                raise ConfigError.invalid("base", type(base).__name__, "needs a base schedule without loss "
                                          "estimates or sequential pushes")
        self.base = base
        self.n = self.m + 1
        self._outer = outer_matrix(self.m)

    def _extend(self, S: np.ndarray) -> np.ndarray:
        out = np.zeros((self.n, self.n))
        out[: self.m, : self.m] = S
        out[self.m, self.m] = 1.0
        return out

    def init_state(self) -> ScheduleState:
        return {} if self.base is None else self.base.init_state()

    def is_outer(self, step: int) -> bool:
        """Whether an outer round follows step ``step``."""
        return (step + 1) % self.period == 0

    def advance(self, step: int, ctx: MixContext, state: ScheduleState) -> tuple[Mix | None, ScheduleState]:
        base_mix = None
        if self.base is not None:
            base_mix, state = self.base.advance(step, ctx, state)
        if self.is_outer(step):
            return Mix(self._outer, "allreduce", round=step // self.period, info={"outer": True}), state
        if base_mix is None:
            return None, state
        return Mix(self._extend(base_mix.matrix), base_mix.pattern, round=base_mix.round,
                   info=dict(base_mix.info)), state

    def mix(self, step: int, ctx: MixContext | None = None) -> Mix | None:
        return self.advance(step, ctx if ctx is not None else MixContext(step=step), self.init_state())[0]

    def active(self, step: int) -> np.ndarray | None:
        return None if self.base is None else self.base.active(step)

    def wants_losses(self, step: int, state: ScheduleState) -> bool:
        return False

    def matrices(self, limit: int = 4096) -> list[np.ndarray] | None:
        mats = [self._outer]
        if self.base is not None:
            base = self.base.matrices(limit)
            if base is None:
                return None
            mats += [self._extend(M) for M in base]
        return mats
