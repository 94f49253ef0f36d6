"""The asynchronous server's state and arrivals on stacked rows (:mod:`coopsgd.algorithms.asynchronous`).

:class:`AsyncServer` holds what an asynchronous run keeps besides the model rows: the copy ``y_j`` each slot
pulled (one row per slot, C x d: only the arriving slots' rows are touched), the buffer b, the server's momentum
u and delayed Nesterov's accumulator a (d each), and a small JSON-ready ledger (the server version, each slot's
pulled version, the buffered count, the server-step count, the staleness statistics). It works on torch tensors
(the simulator) or numpy arrays (the reference engine) through the same arithmetic, in the same order, so the
two engines compute the same numbers. Checkpoints hold all of it (:meth:`state_dict`); under
``nan_policy="skip"`` it is snapshot and restored with the rows (:meth:`snapshot`, :meth:`restore`).

One arrival of the worker ``w`` holding slot ``j`` (x its model row, z the server row)::

    s = version - v_j;  b <- b + w(s) (y_j - x);  buffered += 1
    if buffered == K:  g = b / K;  server step on z with g (delayed Nesterov, eq. DN);  b <- 0;  version += 1

Eq. DN (server step t, counted from 1; eta, beta, N as in :class:`~coopsgd.algorithms.asynchronous.AsyncAggregation`)::

    a <- a + g
    if t mod N == 0:  u <- beta u + a / N;  z <- z - eta (g / N + beta u);  a <- 0
    else:             z <- z - eta g / N

With N = 1 (computed without a) it is ``torch.optim.SGD(nesterov=True)``; with beta = 0 plain ``z <- z - eta g``.
    the next worker w' of the slot pulls: x_w' <- z;  y_j <- z;  v_j <- version
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coopsgd.algorithms.asynchronous import AsyncAggregation, AsyncStep
from coopsgd.errors import ConfigError

__all__ = ["AsyncServer", "ArrivalReport"]

Rows = Any  # a torch Tensor or a numpy array (n, d)


class ArrivalReport:
    """What one step's arrivals did: the arriving workers, their staleness, the server steps taken."""

    __slots__ = ("workers", "staleness", "server_steps")

    def __init__(self) -> None:
        self.workers: list[int] = []
        self.staleness: list[int] = []
        self.server_steps = 0

    def info(self) -> dict[str, Any]:
        return {"arrivals": list(self.workers), "staleness": list(self.staleness), "server_steps": self.server_steps}


class AsyncServer:
    """An asynchronous server's state over ``slots`` slots of ``d`` parameters (see the module docstring).

    Args:
        agg: the server's rule.
        slots: C, the number of slots.
        pulled: (C, d) the model each slot's first worker starts from (copied).
        zeros: a function returning a new zero (d,) vector of the engine's kind (torch or numpy).
    """

    def __init__(self, agg: AsyncAggregation, pulled: Rows, zeros: Any) -> None:
        self.agg = agg
        self.slots = int(pulled.shape[0])
        self.d = int(pulled.shape[1])
        self.pulled = pulled.clone() if isinstance(pulled, Tensor) else np.array(pulled, dtype=np.float64)
        self.buffer = zeros()
        self.momentum = zeros()
        self.accum = zeros()
        self.ledger: dict[str, Any] = {"version": 0, "pulled_version": [0] * self.slots, "buffered": 0,
                                       "server_steps": 0, "arrivals": 0, "staleness_sum": 0, "staleness_max": 0}

    # -- the arithmetic ---------------------------------------------------------------------------------------
    def _server_step(self, z: Rows) -> None:
        """One server step on the row ``z`` (in place) with g = b / K (the module docstring's eq. DN)."""
        a, L = self.agg, self.ledger
        g = self.buffer / float(a.buffer_size)
        t = int(L["server_steps"]) + 1
        if a.momentum > 0.0 and a.delayed_nesterov == 1:  # torch's Nesterov SGD: u <- beta u + g
            self.momentum *= a.momentum
            self.momentum += g
            z -= a.lr * (g + a.momentum * self.momentum)
        elif a.momentum > 0.0:  # delayed Nesterov: g / N at every step, the momentum at every N-th
            n = float(a.delayed_nesterov)
            self.accum += g
            if t % a.delayed_nesterov == 0:
                self.momentum *= a.momentum
                self.momentum += self.accum / n
                z -= a.lr * (g / n + a.momentum * self.momentum)
                self.accum *= 0.0
            else:
                z -= a.lr * (g / n)
        else:
            z -= a.lr * g
        self.buffer *= 0.0
        L["server_steps"] = t
        L["version"] = int(L["version"]) + 1

    def receive(self, z: Rows, delta: Rows, slot: int) -> tuple[int, bool]:
        """One arrival's pseudo-gradient ``delta`` (y_j - x) from ``slot``: buffered with its staleness weight, and
        a server step on ``z`` (in place) when the buffer is full. Returns the staleness and whether z stepped."""
        L = self.ledger
        s = int(L["version"]) - int(L["pulled_version"][slot])
        weight = self.agg.weight(s)
        if weight == 1.0:
            self.buffer += delta
        else:
            self.buffer += weight * delta
        L["buffered"] = int(L["buffered"]) + 1
        L["arrivals"] = int(L["arrivals"]) + 1
        L["staleness_sum"] = int(L["staleness_sum"]) + s
        L["staleness_max"] = max(int(L["staleness_max"]), s)
        stepped = L["buffered"] == self.agg.buffer_size
        if stepped:
            self._server_step(z)
            L["buffered"] = 0
        return s, stepped

    def arrive(self, params: Rows, server: int, event: AsyncStep) -> ArrivalReport:
        """Apply ``event``'s arrivals, in order, to ``params`` ((n, d) parameter rows, changed in place; row
        ``server`` is z). Nothing is checked here: :meth:`rows_written` says which rows to check."""
        rep = ArrivalReport()
        z = params[server]
        for slot, w, nxt in event.arrivals:
            s, stepped = self.receive(z, self.pulled[slot] - params[w], slot)
            rep.workers.append(int(w))
            rep.staleness.append(s)
            rep.server_steps += int(stepped)
            self._pull(params, z, slot, nxt)
        return rep

    def _pull(self, params: Rows, z: Rows, slot: int, nxt: int) -> None:
        """The slot's next worker pulls z: ``x_nxt <- z;  y_slot <- z;  v_slot <- version``."""
        params[nxt] = z
        self.pulled[slot] = z
        self.ledger["pulled_version"][slot] = int(self.ledger["version"])

    def pull_only(self, params: Rows, server: int, event: AsyncStep) -> None:
        """A dropped step's arrivals (``nan_policy="skip"``): nothing is received, but the timeline still hands
        each slot to its next worker, which pulls z, so that every training worker's row is the copy its slot
        pulled (the slot invariant ``x_w = y_j`` at the start of a round)."""
        z = params[server]
        for slot, _, nxt in event.arrivals:
            self._pull(params, z, slot, nxt)

    def on_push(self, z: Tensor, push: Tensor, rank: int) -> None:
        """The rule of a real parameter server (:class:`~coopsgd.engines.distributed.parameter_server.AsyncParameterServer`,
        one slot per rank): a push ``x - b`` is the pseudo-gradient ``-(push)``; the rank then pulls z at the new
        version (the server keeps the pulled copies b itself)."""
        self.receive(z, -push, rank)
        self.ledger["pulled_version"][rank] = int(self.ledger["version"])

    @staticmethod
    def rows_written(server: int, event: AsyncStep) -> list[int]:
        """The model rows an event's arrivals write: z and each next worker (sorted)."""
        return sorted({server, *(nxt for _, _, nxt in event.arrivals)})

    # -- statistics -------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The staleness statistics (:data:`~coopsgd.algorithms.asynchronous.ASYNC_STATS`)."""
        L = self.ledger
        n = int(L["arrivals"])
        return {"arrivals": n, "server_updates": int(L["server_steps"]),
                "staleness_mean": float(L["staleness_sum"]) / n if n else None,
                "staleness_max": int(L["staleness_max"]) if n else None}

    # -- checkpoints and rollback -----------------------------------------------------------------------------
    def _vectors(self) -> dict[str, Rows]:
        return {"pulled": self.pulled, "buffer": self.buffer, "momentum": self.momentum, "accum": self.accum}

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v.clone() if isinstance(v, Tensor) else v.copy() for k, v in self._vectors().items()}
        out["ledger"] = copy.deepcopy(self.ledger)
        return out

    def restore(self, snap: dict[str, Any]) -> None:
        for k, v in self._vectors().items():
            v[...] = snap[k]
        self.ledger = copy.deepcopy(snap["ledger"])

    def state_dict(self) -> dict[str, Any]:
        """Copies of the vectors (CPU tensors, or numpy arrays for the reference engine) and the ledger."""
        out: dict[str, Any] = {k: (v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v.copy())
                               for k, v in self._vectors().items()}
        out["ledger"] = copy.deepcopy(self.ledger)
        return out

    def load_state_dict(self, state: dict[str, Any] | None, field: str) -> None:
        if state is None:
            raise ConfigError.invalid(field, None, "the checkpoint holds no asynchronous server state")
        for k, v in self._vectors().items():
            got = state.get(k)
            if got is None or tuple(got.shape) != tuple(v.shape):
                raise ConfigError.invalid(f"{field}.{k}", None if got is None else tuple(got.shape),
                                          f"expected {tuple(v.shape)}")
            v[...] = (torch.as_tensor(np.asarray(got)) if not isinstance(got, Tensor) else got) if isinstance(v, Tensor) \
                else np.asarray(got, dtype=np.float64)
        ledger = state.get("ledger")
        if not isinstance(ledger, dict) or len(ledger.get("pulled_version", ())) != self.slots:
            raise ConfigError.invalid(f"{field}.ledger", ledger, f"a ledger of {self.slots} slots")
        self.ledger = copy.deepcopy(ledger)


def start_rows(schedule: Any) -> Sequence[int]:
    """The worker rows each slot starts from (the schedule's first workers)."""
    return list(schedule.initial_workers())

