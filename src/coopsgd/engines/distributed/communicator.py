"""The distributed engine's communicator: one round ``X <- X S`` across processes (:class:`Mixer`).

:class:`Mixer` implements :class:`coopsgd.engines.base.Communicator` for the rows one rank holds (its
worker, then the auxiliaries it keeps). It takes the same typed round as the simulator's communicator
(:func:`coopsgd.engines.mixing.plan_round`) and derives its collectives from that plan
(:func:`coopsgd.engines.distributed.collectives.lower`: all-reduce, neighbour exchange, broadcast, all-gather, process
subgroups for placed auxiliaries -- the placement is documented there). A round runs in three stages:

* **select** what this rank sends: its worker row (broadcast, neighbour exchange, all-gather) and its
  weighted shares ``w_r x_r`` of the reductions;
* **transport** (the collectives; a compressor's encode / decode wraps exactly this stage);
* **combine**: its worker column and the auxiliary columns from the received rows and the plan's weights.

Non-blocking rounds (``overlap=True``, [CSGD] §3.3): when the worker columns do not need the all_reduce
(EASGD, generalized elastic, hierarchical), it is started with ``async_op=True`` and the auxiliaries'
new values are completed only when next needed (:meth:`Mixer.finalize`, called at the next round or
before any read of an auxiliary). The worker rows use the *old* auxiliaries, exactly as ``X S`` does, so
the iterates are those of the blocking algorithm; only time changes.

Network emulation (:class:`NetEmulation`): every operation takes at least the alpha-beta time of that
operation (:func:`coopsgd.theory.cost.round_cost` priced by a :class:`~coopsgd.theory.cost.NetworkModel`;
each rank sleeps for what the real transfer did not use), so the papers' slow networks can be felt on
one machine; an asynchronous operation completes no earlier than ``launch + delay`` (the delay overlaps
computation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from coopsgd.engines.distributed.collectives import (
    AuxFrom,
    Collectives,
    Exchange,
    PlacedCollectives,
    aux_host,
    aux_placement,
    lower,
    lower_placed,
)
from coopsgd.engines.mixing import Round, RoundKind, plan_round
from coopsgd.errors import CoopSGDError, check_float
from coopsgd.theory.cost import NetworkModel, RoundCost, round_cost

__all__ = [
    "CommunicationError",
    "NetEmulation",
    "CommStats",
    "aux_placement",
    "Mixer",
    "aux_host",
]


class CommunicationError(CoopSGDError, RuntimeError):
    """A collective or point-to-point operation failed or timed out (usually because a peer died or hung)."""


# ---------------------------------------------------------------------------------------------------------
# network emulation and accounting
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetEmulation:
    """Emulated link: ``latency_ms`` per handshake and ``bandwidth_mbps`` (megabit/s); ``None`` = not emulated."""

    latency_ms: float | None = None
    bandwidth_mbps: float | None = None

    def __post_init__(self) -> None:
        if self.latency_ms is not None:
            object.__setattr__(self, "latency_ms", check_float("net_latency_ms", self.latency_ms, low=0.0))
        if self.bandwidth_mbps is not None:
            object.__setattr__(
                self, "bandwidth_mbps", check_float("net_bandwidth_mbps", self.bandwidth_mbps, low=0.0, low_open=True)
            )

    @property
    def enabled(self) -> bool:
        return self.latency_ms is not None or self.bandwidth_mbps is not None

    @property
    def model(self) -> NetworkModel:
        """The equivalent alpha-beta model (an unset part costs nothing)."""
        lat = (self.latency_ms or 0.0) / 1e3
        bw = math.inf if self.bandwidth_mbps is None else self.bandwidth_mbps * 1e6 / 8.0
        return NetworkModel(latency_s=lat, bandwidth_Bps=bw if math.isfinite(bw) else 1e300)

    def delay(self, cost: RoundCost) -> float:
        """Seconds to add for one operation of ``cost``: its transfer (the codec time is really spent)."""
        if not self.enabled:
            return 0.0
        return self.model.transfer_time(cost)


@dataclass
class CommStats:
    """Per-rank communication accounting.

    Attributes:
        bytes_sent: payload bytes this rank put on the wire (ring all-reduce ``2N(m-1)/m``, ring all-gather
            ``N(m-1)``, tree broadcast ``N(m-1)/m`` on average, ``N`` per point-to-point send).
        bytes_model: the alpha-beta model's bytes through the busiest link (as the simulator counts them).
        ops: number of operations per kind.
        comm_s: seconds spent inside blocking operations and waiting for asynchronous ones (emulated
            delays included).
        emulated_s: the part of ``comm_s`` that was emulated delay.
    """

    bytes_sent: float = 0.0
    bytes_model: float = 0.0
    ops: dict[str, int] = field(default_factory=dict)
    comm_s: float = 0.0
    emulated_s: float = 0.0

    def count(self, kind: str, sent: float, cost: RoundCost | None) -> None:
        self.ops[kind] = self.ops.get(kind, 0) + 1
        self.bytes_sent += float(sent)
        if cost is not None:
            self.bytes_model += float(cost.bytes_sent)


# ---------------------------------------------------------------------------------------------------------
# the mixer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Launched:
    """A non-blocking all_reduce in flight: its work, buffer, launch time and emulated duration."""

    work: Any
    buf: Tensor
    t0: float
    delay: float


@dataclass
class _Pending:
    works: list[Any]  # asynchronous collectives to wait for
    launched: float
    delay: float  # emulated duration (the operation completes no earlier than launched + delay)
    complete: Callable[[], None]  # writes the auxiliaries' new values once the works are done


def _all_gather_single(out: Tensor, inp: Tensor, group: Any) -> None:
    fn = getattr(dist, "all_gather_single", None)
    if fn is not None:
        fn(out, inp, group=group)
    else:  # older torch
        dist.all_gather_into_tensor(out, inp, group=group)


class Mixer:
    """Applies mixing matrices to the rows one rank holds: ``rows[0]`` its worker, ``rows[1:]`` the auxiliaries.

    Args:
        rank, workers, auxiliaries: this rank, m and v.
        net: network emulation (``None``: none).
        group: the process group (default: the world).
        on_finalize: called after deferred auxiliary values are written (the engine re-zeroes the
            auxiliaries' momentum columns there).
        holders: per auxiliary, the ranks holding it (:func:`aux_placement`); ``None``: every rank holds
            every auxiliary. With a placement, rows of auxiliaries this rank does not hold are left as
            they are (stale) and :meth:`collect_aux` gives their current values.
        matrices: the matrices the schedule will produce (when known): their process subgroups are
            created at construction, a collective every rank must take part in.
    """

    def __init__(
        self,
        rank: int,
        workers: int,
        auxiliaries: int,
        *,
        net: NetEmulation | None = None,
        group: Any = None,
        on_finalize: Callable[[], None] | None = None,
        holders: tuple[tuple[int, ...], ...] | None = None,
        matrices: list[np.ndarray] | None = None,
    ) -> None:
        self.rank = int(rank)
        self.m = int(workers)
        self.v = int(auxiliaries)
        self.net = net or NetEmulation()
        self.group = group
        self.stats = CommStats()
        self.on_finalize = on_finalize
        self._pending: _Pending | None = None
        if holders is not None:
            holders = tuple(tuple(sorted(int(r) for r in h)) for h in holders)
            if len(holders) != self.v or any(not h or h[0] < 0 or h[-1] >= self.m for h in holders):
                raise ValueError(f"holders must give a non-empty set of ranks in [0, {self.m}) per auxiliary, got {holders}")
            if group is not None:
                raise ValueError("a placement (holders) needs the default (world) process group")
        self.holders = holders
        self._subgroups: dict[tuple[int, ...], Any] = {}
        if holders is not None:
            for S in matrices or ():
                lowered = self.lower(plan_round(S))
                assert isinstance(lowered, PlacedCollectives)
                for ranks, _ in lowered.reductions:
                    self._subgroup(ranks)

    # -- placement ---------------------------------------------------------------------------------------
    @property
    def placed(self) -> bool:
        """True when auxiliaries are held by subsets of ranks (else every rank holds every auxiliary)."""
        return self.holders is not None

    def holds(self, aux: int) -> bool:
        return self.holders is None or self.rank in self.holders[aux]

    def host(self, aux: int) -> int:
        """The designated host of auxiliary ``aux``: the first holder (placed), else ``aux % m``."""
        return aux_host(aux, self.m) if self.holders is None else self.holders[aux][0]

    def _subgroup(self, ranks: tuple[int, ...]) -> Any:
        """The process group of ``ranks`` (the world when all of them), created once, collectively."""
        if len(ranks) == self.m:
            return self.group
        g = self._subgroups.get(ranks)
        if g is None:
            timeout = None
            try:  # the same timeout as the world group (new_group's default is 30 minutes)
                timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 -- not gloo / private API changed: torch's default
                timeout = None
            g = dist.new_group(list(ranks), timeout=timeout)
            self._subgroups[ranks] = g
        return g

    def collect_aux(self, Z: Tensor) -> Tensor:
        """Every auxiliary's current row (v, W) on every rank (collective when placed): ``Z`` is this rank's."""
        self.finalize()
        if self.holders is None or self.v == 0:
            return Z.clone()
        buf = torch.zeros_like(Z)
        for a in range(self.v):
            if self.host(a) == self.rank:
                buf[a].copy_(Z[a])
        dist.all_reduce(buf, group=self.group)  # exact: one non-zero term per entry
        return buf

    # -- the lowering of a round ---------------------------------------------------------------------
    def lower(self, rnd: Round) -> Collectives | PlacedCollectives:
        """The collectives of the round ``rnd`` on this process group, derived once per plan."""
        key = ("collectives", self.m, self.v, self.holders)
        if self.holders is None:
            return rnd.plan.derived(key, lambda: lower(rnd.matrix, self.m, self.v))
        holders = self.holders
        return rnd.plan.derived(key, lambda: lower_placed(rnd.matrix, holders))

    def exchanges(self, rnd: Round) -> bool:
        """Whether the round ``rnd`` moves data between ranks here (a liveness hook's question)."""
        return rnd.kind is not RoundKind.IDENTITY and self.lower(rnd).communicates

    # -- primitive operations (timed, emulated, counted; errors become CommunicationError) ----------------
    def _finish(self, kind: str, t0: float, cost: RoundCost | None, sent: float) -> None:
        # the emulated link makes the operation take at least its alpha-beta time (the real loopback
        # transfer counts toward it), as an asynchronous one completes no earlier than launch + delay
        d = (self.net.delay(cost) if cost is not None else 0.0) - (time.perf_counter() - t0)
        if d > 0:
            time.sleep(d)
            self.stats.emulated_s += d
        self.stats.comm_s += time.perf_counter() - t0
        self.stats.count(kind, sent, cost)

    def _fail(self, what: str, exc: BaseException) -> CommunicationError:
        return CommunicationError(f"rank {self.rank}: {what} failed: {str(exc).splitlines()[0][:300]}")

    def all_reduce(self, t: Tensor, ranks: tuple[int, ...] | None = None) -> None:
        """Sum ``t`` over the world, or over the subgroup of ``ranks``."""
        size = self.m if ranks is None else len(ranks)
        group = self.group if ranks is None else self._subgroup(ranks)
        t0 = time.perf_counter()
        try:
            dist.all_reduce(t, group=group)
        except Exception as exc:
            where = "" if ranks is None or size == self.m else f" in the group of ranks {list(ranks)}"
            raise self._fail(f"all_reduce{where}", exc) from exc
        n = t.numel()
        es = t.element_size()
        cost = round_cost("allreduce", workers=size, params=n, bytes_per_param=es)
        self._finish("all_reduce" if size == self.m else "group_all_reduce", t0, cost, 2.0 * n * es * (size - 1) / size)

    def broadcast(self, t: Tensor, src: int) -> None:
        t0 = time.perf_counter()
        try:
            dist.broadcast(t, src=src, group=self.group)
        except Exception as exc:
            raise self._fail(f"broadcast from rank {src}", exc) from exc
        n, es = t.numel(), t.element_size()
        cost = round_cost("broadcast", workers=self.m, params=n, bytes_per_param=es)
        self._finish("broadcast", t0, cost, n * es * (self.m - 1) / self.m)

    def all_gather(self, t: Tensor) -> Tensor:
        """(m, N) rows of every rank's ``t`` (N = t.numel())."""
        out = torch.empty(self.m * t.numel(), dtype=t.dtype, device=t.device)
        t0 = time.perf_counter()
        try:
            _all_gather_single(out, t.contiguous().reshape(-1), self.group)
        except Exception as exc:
            raise self._fail("all_gather", exc) from exc
        n, es = t.numel(), t.element_size()
        cost = RoundCost("allgather", self.m if self.m > 1 else 0, float(n * (self.m - 1)), float(n * (self.m - 1) * es))
        self._finish("all_gather", t0, cost, n * es * (self.m - 1))
        return out.view(self.m, -1)

    # -- byte transport of compressed payloads (:mod:`coopsgd.engines.distributed.compressed`) -------------
    # Each moves one packed uint8 payload per sending rank and is charged once per round by :meth:`charge`
    # (the round's alpha-beta cost, which the compressed stage computes as the simulator's clock does).
    def gather_bytes(self, buf: Tensor) -> Tensor:
        """(m, N) every rank's uint8 ``buf`` (N bytes each), not charged (see :meth:`charge`)."""
        out = torch.empty(self.m * buf.numel(), dtype=buf.dtype, device=buf.device)
        try:
            _all_gather_single(out, buf.contiguous().reshape(-1), self.group)
        except Exception as exc:
            raise self._fail("all_gather of compressed payloads", exc) from exc
        return out.view(self.m, -1)

    def broadcast_bytes(self, buf: Tensor, src: int) -> None:
        """Overwrite ``buf`` on every rank with rank ``src``'s, not charged (see :meth:`charge`)."""
        try:
            dist.broadcast(buf, src=src, group=self.group)
        except Exception as exc:
            raise self._fail(f"broadcast of a compressed payload from rank {src}", exc) from exc

    def exchange_bytes(self, buf: Tensor | None, send_to: Sequence[int], recv_from: Sequence[int],
                       nbytes: int, device: torch.device | None = None) -> dict[int, Tensor]:
        """Point-to-point: send ``buf`` to the ranks ``send_to``, receive ``nbytes`` bytes from each rank of
        ``recv_from`` into buffers on ``device`` (default: ``buf``'s, else the CPU) with batched isend / irecv;
        not charged (see :meth:`charge`)."""
        ops = []
        got: dict[int, Tensor] = {}
        if device is None:
            device = buf.device if buf is not None else torch.device("cpu")
        for j in recv_from:
            got[j] = torch.empty(nbytes, dtype=torch.uint8, device=device)
            ops.append(dist.P2POp(dist.irecv, got[j], j, group=self.group))
        for i in send_to:
            assert buf is not None
            ops.append(dist.P2POp(dist.isend, buf, i, group=self.group))
        if ops:
            try:
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            except Exception as exc:
                peers = sorted(set(recv_from) | set(send_to))
                raise self._fail(f"exchange of compressed payloads with ranks {peers}", exc) from exc
        return got

    def charge(self, kind: str, t0: float, costs: Sequence[RoundCost], sent: float) -> None:
        """Account one compressed round whose transport started at ``t0``: the emulated link makes it last at
        least the alpha-beta time of ``costs`` (the simulator's cost items of the round), ``sent`` bytes went
        on the wire from this rank, and ``bytes_model`` grows by the items' bytes."""
        total = RoundCost(costs[0].pattern if costs else "none", sum(c.handshakes for c in costs),
                          float(sum(c.floats_sent for c in costs)), float(sum(c.bytes_sent for c in costs)))
        self._finish(kind, t0, total, sent)

    def gather_floats(self, values: np.ndarray | float) -> np.ndarray:
        """All-gather one small float64 vector per rank (LSGD loss estimates): returns (m, k)."""
        t = torch.as_tensor(np.atleast_1d(np.asarray(values, dtype=np.float64)), dtype=torch.float64)
        return self.all_gather(t).numpy().copy()

    def exchange(self, x: Tensor, plan: Collectives) -> dict[int, Tensor]:
        """Neighbour exchange: send ``x`` to out-neighbours, receive from in-neighbours (batched p2p)."""
        r = self.rank
        ops = []
        got: dict[int, Tensor] = {}
        for j in plan.in_nbrs[r]:
            got[j] = torch.empty_like(x)
            ops.append(dist.P2POp(dist.irecv, got[j], j, group=self.group))
        for i in plan.out_nbrs[r]:
            ops.append(dist.P2POp(dist.isend, x, i, group=self.group))
        t0 = time.perf_counter()
        if ops:
            try:
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            except Exception as exc:
                peers = sorted(set(plan.in_nbrs[r]) | set(plan.out_nbrs[r]))
                raise self._fail(f"neighbour exchange with ranks {peers}", exc) from exc
        n, es = x.numel(), x.element_size()
        deg = max(1, plan.max_degree) if self.m > 1 else 0
        cost = round_cost("neighbor", workers=self.m, params=n, max_degree=min(deg, self.m - 1), bytes_per_param=es)
        self._finish("neighbor", t0, cost, n * es * len(plan.out_nbrs[r]))
        return got

    # -- rounds ----------------------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return self._pending is not None

    def finalize(self) -> None:
        """Complete a deferred (non-blocking) auxiliary update: wait, then write the auxiliaries."""
        p = self._pending
        if p is None:
            return
        self._pending = None
        t0 = time.perf_counter()
        try:
            for work in p.works:
                work.wait()
        except Exception as exc:
            raise self._fail("non-blocking all_reduce", exc) from exc
        remaining = p.launched + p.delay - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
            self.stats.emulated_s += remaining
        self.stats.comm_s += time.perf_counter() - t0
        p.complete()
        if self.on_finalize is not None:
            self.on_finalize()

    def communicate(self, rows: Tensor, rnd: Round, *, overlap: bool = False) -> None:
        """Replace ``rows`` (1+v, W) -- this rank's worker and the auxiliaries -- by their columns of ``X S``
        for the round ``rnd``, with the collectives of its plan (:meth:`lower`).

        With ``overlap`` an all_reduce that feeds only auxiliaries runs asynchronously; the auxiliary rows
        then keep their old values until :meth:`finalize` (called at the start of the next round).
        """
        self.finalize()
        if rnd.kind is RoundKind.IDENTITY:
            return
        col = self.lower(rnd)
        S = np.asarray(rnd.matrix, dtype=np.float64)
        if isinstance(col, PlacedCollectives):
            self._communicate_placed(rows, S, col, overlap)
            return
        x, Z = rows[0], rows[1:]
        # J over workers with no auxiliaries: one in-place all_reduce (sum, then divide)
        if col.exchange is Exchange.REDUCE and self.v == 0 and col.reduce_const[0] is not None and x.is_contiguous():
            self.all_reduce(x)
            x.mul_(col.reduce_const[0])
            return
        got, X_all = self._send_rows(x, col)
        red, deferred = self._reduce(x, col, overlap)
        if col.exchange is Exchange.GATHER:
            assert X_all is not None
            new_x = self._weights(S[: self.m, self.rank], x) @ X_all
        elif col.exchange is Exchange.REDUCE:
            assert red is not None and col.worker_vector is not None
            new_x = red[col.worker_vector].clone()
        else:
            new_x = self._combine_rows(x, S, got)
        if self.v:
            wa = S[self.m :, self.rank]
            if np.any(wa):
                new_x.add_(self._weights(wa, x) @ Z)
            self._aux_columns(x, Z, S, col, got, X_all, red, deferred)
        x.copy_(new_x)

    def mix(self, rows: Tensor, S: np.ndarray, *, overlap: bool = False) -> None:
        """:meth:`communicate` of a bare matrix S (planned by :func:`~coopsgd.engines.mixing.plan_round`)."""
        self.communicate(rows, plan_round(S), overlap=overlap)

    @staticmethod
    def _weights(values: np.ndarray, like: Tensor) -> Tensor:
        # a copy: the values are a column of the round's read-only S (torch warns on a non-writable array)
        return torch.tensor(np.asarray(values), dtype=like.dtype, device=like.device)

    def _send_rows(self, x: Tensor, col: Collectives) -> tuple[dict[int, Tensor], Tensor | None]:
        """Select and transport the worker rows the round reads: broadcasts, then the all_gather or the
        neighbour exchange. Returns the received rows by worker and the gathered (m, W) rows (or ``None``)."""
        got: dict[int, Tensor] = {}
        for j in col.bcast_sources:
            buf = x.clone() if j == self.rank else torch.empty_like(x)
            self.broadcast(buf, j)
            got[j] = buf
        X_all = self.all_gather(x) if col.exchange is Exchange.GATHER else None
        if col.exchange is Exchange.NEIGHBOR:
            got.update(self.exchange(x.contiguous(), col))
        return got, X_all

    def _combine_rows(self, x: Tensor, S: np.ndarray, got: dict[int, Tensor]) -> Tensor:
        """Combine: this rank's worker column from its own row and the received ones, ``sum_j S[j, r] x_j``."""
        r = self.rank
        new_x = x * float(S[r, r])
        for j, xj in got.items():
            w = float(S[j, r])
            if j != r and w != 0.0:
                new_x.add_(xj, alpha=w)
        return new_x

    def _reduce(self, x: Tensor, col: Collectives, overlap: bool) -> tuple[Tensor | None, _Launched | None]:
        """The round's reductions: one all_reduce of this rank's shares ``w_r x_r`` of the K vectors (blocking:
        the scaled sums; non-blocking when only auxiliaries read them: the launched operation)."""
        K = len(col.reduce_vectors)
        if not K:
            return None, None
        buf = torch.empty((K, x.numel()), dtype=x.dtype, device=x.device)
        for k in range(K):
            if col.reduce_const[k] is not None:
                buf[k].copy_(x)
            else:
                buf[k].copy_(x).mul_(float(col.reduce_vectors[k, self.rank]))
        if overlap and col.deferrable:
            m = self.m
            es = buf.element_size()
            cost = round_cost("allreduce", workers=m, params=buf.numel(), bytes_per_param=es)
            t0 = time.perf_counter()
            try:
                work = dist.all_reduce(buf, group=self.group, async_op=True)
            except Exception as exc:
                raise self._fail("non-blocking all_reduce", exc) from exc
            self.stats.comm_s += time.perf_counter() - t0
            self.stats.count("all_reduce_async", 2.0 * buf.numel() * es * (m - 1) / m, cost)
            return None, _Launched(work, buf, t0, self.net.delay(cost))
        self.all_reduce(buf)
        for k, c in enumerate(col.reduce_const):
            if c is not None:
                buf[k].mul_(c)
        return buf, None

    def _aux_columns(self, x: Tensor, Z: Tensor, S: np.ndarray, col: Collectives, got: dict[int, Tensor],
                     X_all: Tensor | None, red: Tensor | None, launched: _Launched | None) -> None:
        """Combine the auxiliary columns (replicated on every rank); a launched reduction completes them at
        :meth:`finalize`."""
        m, r = self.m, self.rank
        new_Z = self._weights(S[m:, m:], x).T @ Z
        targets: list[tuple[int, int]] = []
        for a, src in enumerate(col.aux_sources):
            if src.kind is AuxFrom.GATHER:
                assert X_all is not None
                new_Z[a].add_(self._weights(S[:m, m + a], x) @ X_all)
            elif src.kind is AuxFrom.BROADCAST:
                j = src.index
                new_Z[a].add_(x if j == r else got[j], alpha=float(S[j, m + a]))
            elif src.kind is AuxFrom.REDUCE:
                if launched is None:
                    assert red is not None
                    new_Z[a].add_(red[src.index])
                else:
                    targets.append((a, src.index))
        if launched is None:
            Z.copy_(new_Z)
            return
        buf = launched.buf

        def complete() -> None:
            for k, c in enumerate(col.reduce_const):
                if c is not None:
                    buf[k].mul_(c)
            for a, k in targets:
                new_Z[a].add_(buf[k])
            Z.copy_(new_Z)

        self._pending = _Pending([launched.work], launched.t0, launched.delay, complete)

    def _communicate_placed(self, rows: Tensor, S: np.ndarray, col: PlacedCollectives, overlap: bool) -> None:
        """A round with placed auxiliaries: the worker block as usual, auxiliary columns by (sub)group reductions."""
        m, r = self.m, self.rank
        x, Z = rows[0], rows[1:]
        wp = col.worker
        got, X_all = self._send_rows(x, wp)
        if X_all is not None:
            new_x = self._weights(S[:m, r], x) @ X_all
        elif wp.exchange is Exchange.REDUCE:
            assert wp.worker_vector is not None
            new_x = x.clone()
            c = wp.reduce_const[wp.worker_vector]
            if c is None:
                new_x.mul_(float(wp.reduce_vectors[wp.worker_vector, r]))
            self.all_reduce(new_x)
            if c is not None:
                new_x.mul_(c)
        else:
            new_x = self._combine_rows(x, S, got)
        held = [a for a in range(self.v) if self.holds(a)]
        for a in held:  # the auxiliaries this worker reads (the placement guarantees they are held)
            w = float(S[m + a, r])
            if w != 0.0:
                new_x.add_(Z[a], alpha=w)
        self._placed_aux_columns(x, Z, S, col, held, overlap)
        x.copy_(new_x)

    def _placed_aux_columns(self, x: Tensor, Z: Tensor, S: np.ndarray, col: PlacedCollectives, held: list[int],
                            overlap: bool) -> None:
        """The auxiliary columns of a placed round: local terms, then one reduction per participant set."""
        m, r = self.m, self.rank
        new_Z = {a: torch.zeros_like(Z[a]) for a in held}
        for a in held:
            for b in np.flatnonzero(col.local_terms[:, a]):
                new_Z[a].add_(Z[int(b)], alpha=float(S[m + int(b), m + a]))
        adds: list[tuple[int, Tensor]] = []
        works: list[Any] = []
        t_launch = time.perf_counter()
        delay = 0.0
        for ranks, auxes in col.reductions:
            if r not in ranks:
                continue
            buf = torch.zeros((len(auxes), x.numel()), dtype=x.dtype, device=x.device)
            for k, a in enumerate(auxes):
                w = float(S[r, m + a])
                if w != 0.0:
                    buf[k].add_(x, alpha=w)
                for bb in np.flatnonzero(S[m:, m + a]):
                    src = int(bb)
                    if not col.local_terms[src, a] and self.host(src) == r:
                        buf[k].add_(Z[src], alpha=float(S[m + src, m + a]))
            if len(ranks) == 1:  # a group of one (e.g. groups of one worker): nothing to exchange
                pass
            elif overlap:
                work, cost_delay = self._all_reduce_async(buf, ranks)
                works.append(work)
                delay = max(delay, cost_delay)
            else:
                self.all_reduce(buf, ranks)
            adds.extend((a, buf[k]) for k, a in enumerate(auxes) if self.holds(a))

        def complete() -> None:
            for a, t in adds:
                new_Z[a].add_(t)
            for a in held:
                Z[a].copy_(new_Z[a])

        if works:
            self._pending = _Pending(works, t_launch, delay, complete)
        else:
            complete()

    def _all_reduce_async(self, buf: Tensor, ranks: tuple[int, ...]) -> tuple[Any, float]:
        """Launch a non-blocking all_reduce over ``ranks``: returns the work and its emulated delay."""
        size = len(ranks)
        es = buf.element_size()
        cost = round_cost("allreduce", workers=size, params=buf.numel(), bytes_per_param=es)
        t0 = time.perf_counter()
        try:
            work = dist.all_reduce(buf, group=self._subgroup(ranks), async_op=True)
        except Exception as exc:
            raise self._fail(f"non-blocking all_reduce in the group of ranks {list(ranks)}", exc) from exc
        self.stats.comm_s += time.perf_counter() - t0
        kind = "all_reduce_async" if size == self.m else "group_all_reduce_async"
        self.stats.count(kind, 2.0 * buf.numel() * es * (size - 1) / size, cost)
        return work, self.net.delay(cost)
