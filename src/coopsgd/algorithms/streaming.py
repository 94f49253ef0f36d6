"""Streaming DiLoCo's rounds: fragments synchronised at staggered steps, applied ``delay`` steps later, merged.

Streaming DiLoCo (Douillard et al., 2025, "Streaming DiLoCo with overlapping communication") runs DiLoCo
(:mod:`coopsgd.algorithms.outer`) with the model's parameters split into P *fragments*. With H the outer
period (``tau``), fragment p synchronises after the steps k with

    (k + 1) mod H = o_p,        o_p = floor(p H / P)        (p = 0, ..., P - 1; o_0 = 0: DiLoCo's own rounds)

(the offsets rounded down, so P = 1 gives DiLoCo's schedule). At such a *send* the workers' fragment is
averaged (``a_p``) and z's fragment takes one outer step on the fragment's pseudo-gradient ``z_p - a_p``
(the outer optimizer's state for those coordinates only). The new ``z_p`` reaches the workers
``delay`` = tau_d inner steps later (the *application*, after step k + tau_d; at once when tau_d = 0):
meanwhile they keep training, so the communication overlaps tau_d steps of compute. At the application
every worker's fragment is merged with the merge factor alpha in [0, 1)::

    x_{i,p} <- alpha x_{i,p} + (1 - alpha) z_p           (alpha = 0: every worker restarts from z_p)

z (node m, the model to evaluate) holds the new fragment from the send on; nothing else writes it before
the application, because tau_d < floor(H / P) keeps the rounds of different fragments (and one fragment's
send and application) on different steps. An update still in flight when the run ends is not applied.

The schedule is pure data: a send is a :class:`~coopsgd.algorithms.schedules.Mix` tagged ``info = {"outer":
True, "fragment": p, "fragments": P, "delay": tau_d, "merge_alpha": alpha, "split": split}``, with DiLoCo's outer matrix
``blockdiag(J_m, 1)`` when tau_d = 0 (the workers averaged, then all restart from z) and
:func:`z_average_matrix` when tau_d > 0 (only z receives the workers' average; the workers keep training, so
a distributed engine can leave the reduction in flight until the application); an application (tau_d > 0)
is a ``"local"`` identity mix tagged ``{"fragment": p, "fragments": P, "apply": True, "merge_alpha": alpha,
"split": split}``.
The engines map the fragment index to the columns of :func:`fragment_bounds` of their parameter layout.

Fragments (:func:`fragment_bounds`): with ``split="tensors"`` (the default) consecutive groups of whole
parameter tensors of about equal total size, in the model's parameter order; a layout with fewer tensors than
fragments (an analytic objective's single vector) is cut into P consecutive chunks of ``floor(j d / P)``
coordinates, and so is every layout with ``split="coordinates"`` (equal fragments also when one tensor, such
as a language model's embedding, outweighs the others: whole tensors cannot then reach 1/P of the bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coopsgd.algorithms.outer import outer_matrix
from coopsgd.algorithms.schedules import Mix, MixContext, ScheduleState
from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["StreamingSchedule", "FRAGMENT_SPLITS", "fragment_bounds", "fragment_offsets", "check_streaming", "z_average_matrix"]


#: How the parameters are cut into fragments: whole tensors (equal chunks when there are fewer than P), or
#: equal chunks of the coordinates.
FRAGMENT_SPLITS = ("tensors", "coordinates")


def z_average_matrix(workers: int) -> np.ndarray:
    """Over m workers and z (column convention): z becomes the workers' average, the workers stay as they are."""
    m = check_int("workers", workers, minimum=1)
    S = np.eye(m + 1)
    S[:m, m] = 1.0 / m
    S[m, m] = 0.0
    return S


def fragment_offsets(period: int, fragments: int) -> list[int]:
    """The offsets ``o_p = floor(p H / P)`` of the fragments' rounds within a period H."""
    return [(p * period) // fragments for p in range(fragments)]


def check_streaming(period: int, fragments: int, delay: int, merge_alpha: float) -> tuple[int, int, int, float]:
    """Validated ``(H, P, tau_d, alpha)``: P <= H, 0 <= tau_d < floor(H / P), 0 <= alpha < 1."""
    H = check_int("tau", period, minimum=1)
    P = check_int("fragments", fragments, minimum=1)
    if P > H:
        raise ConfigError.invalid("fragments", P, f"at most tau = {H} (one fragment round per step at most)")
    d = check_int("fragment_delay", delay, minimum=0)
    if d >= H // P:
        raise ConfigError.invalid("fragment_delay", d, f"below floor(tau / fragments) = {H // P} (a fragment's update "
                                  "must be applied before the next fragment's round)")
    a = check_float("merge_alpha", merge_alpha, low=0.0, high=1.0, high_open=True)
    return H, P, d, a


def fragment_bounds(sizes: Sequence[int], fragments: int, split: str = "tensors") -> list[tuple[int, int]]:
    """The column ranges ``[lo, hi)`` of the P fragments of a parameter vector made of tensors of ``sizes``.

    ``split="tensors"`` with at least P tensors: consecutive groups of whole tensors, fragment j ending at the tensor boundary
    nearest to ``j d / P`` (ties to the earlier one) while leaving every fragment at least one tensor. With
    fewer tensors than fragments, or ``split="coordinates"``: P chunks ``[floor(j d / P), floor((j + 1) d / P))`` of the coordinates.
    """
    P = check_int("fragments", fragments, minimum=1)
    sizes = [int(s) for s in sizes]
    d = sum(sizes)
    if d < P:
        raise ConfigError.invalid("fragments", P, f"at most the {d} parameters of the model")
    if split not in FRAGMENT_SPLITS:
        raise ConfigError.invalid("fragment_split", split, f"choose one of {', '.join(FRAGMENT_SPLITS)}")
    if len(sizes) < P or split == "coordinates":
        cuts = [(j * d) // P for j in range(P + 1)]
        return [(cuts[j], cuts[j + 1]) for j in range(P)]
    ends = np.cumsum(sizes).tolist()  # tensor boundaries after tensor t
    cuts = [0]
    t = 0  # the first tensor not yet in a fragment
    for j in range(1, P):
        target = j * d / P
        lo_t, hi_t = t, len(sizes) - (P - j)  # the last tensor of fragment j-1: keeps >= 1 tensor each side
        best = min(range(lo_t, hi_t), key=lambda i: (abs(ends[i] - target), i))
        cuts.append(int(ends[best]))
        t = best + 1
    cuts.append(d)
    return [(cuts[j], cuts[j + 1]) for j in range(P)]


class StreamingSchedule:
    """Streaming DiLoCo's rounds over m workers plus z (node m): see the module docstring.

    Pure, like every schedule: the events of step k follow from k alone (no run state).
    """

    needs_losses = False
    sequential = False

    def __init__(self, workers: int, period: int, fragments: int = 1, delay: int = 0, merge_alpha: float = 0.0,
                 split: str = "tensors") -> None:
        self.m = check_int("workers", workers, minimum=1)
        if split not in FRAGMENT_SPLITS:
            raise ConfigError.invalid("fragment_split", split, f"choose one of {', '.join(FRAGMENT_SPLITS)}")
        self.split = split
        self.period, self.fragments, self.delay, self.merge_alpha = check_streaming(period, fragments, delay,
                                                                                    merge_alpha)
        self.n = self.m + 1
        self.offsets = fragment_offsets(self.period, self.fragments)
        self._slot = {o: p for p, o in enumerate(self.offsets)}
        self._outer = outer_matrix(self.m) if self.delay == 0 else z_average_matrix(self.m)
        self._identity = np.eye(self.n)

    def init_state(self) -> ScheduleState:
        return {}

    def sends(self, step: int) -> int | None:
        """The fragment whose round follows step ``step`` (``None``: none)."""
        return self._slot.get((step + 1) % self.period)

    def applies(self, step: int) -> int | None:
        """The fragment whose delayed update is applied after step ``step`` (``None``: none, or tau_d = 0)."""
        if self.delay == 0 or step + 1 - self.delay < 1:
            return None
        return self.sends(step - self.delay)

    def rounds_through(self, step: int) -> int:
        """The number of fragment rounds after steps 0..step."""
        n, H = step + 1, self.period
        return sum(n // H if o == 0 else ((n - o) // H + 1 if n >= o else 0) for o in self.offsets)

    def advance(self, step: int, ctx: MixContext, state: ScheduleState) -> tuple[Mix | None, ScheduleState]:
        p = self.sends(step)
        info = {"fragment": p, "fragments": self.fragments, "merge_alpha": self.merge_alpha, "split": self.split}
        if p is not None:
            return Mix(self._outer, "allreduce", round=self.rounds_through(step) - 1,
                       info={"outer": True, **info, "delay": self.delay}), state
        p = self.applies(step)
        if p is not None:
            info["fragment"] = p
            return Mix(self._identity, "local", round=self.rounds_through(step) - 1, info={**info, "apply": True}), state
        return None, state

    def mix(self, step: int, ctx: MixContext | None = None) -> Mix | None:
        return self.advance(step, ctx if ctx is not None else MixContext(step=step), {})[0]

    def active(self, step: int) -> np.ndarray | None:
        return None

    def wants_losses(self, step: int, state: ScheduleState) -> bool:
        return False

    def matrices(self, limit: int = 4096) -> list[np.ndarray] | None:
        return [self._outer]
